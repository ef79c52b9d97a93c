# data/ is a package so that train.py, sample.py and the tests can `from data.common import ...`
