"""Prompts that exercise what the teacher knows: questions of the chat evaluation's four kinds (facts, arithmetic,
definitions, instructions) about other things. No question of data/chat_questions.json is here, nor any of its
facts asked another way (checked below); the teacher's answers, not true ones, become the distillation text.
    python3 results/smollm2-adapted/facts/make_prompts.py > results/smollm2-adapted/facts/prompts.txt"""
import itertools, json, os, random

capitals = ["Spain", "Portugal", "Canada", "Russia", "China", "Egypt", "Kenya", "Australia", "Norway", "Sweden",
            "Poland", "Ireland", "Argentina", "Peru", "Turkey", "Thailand", "South Korea", "the Netherlands",
            "Belgium", "Switzerland", "Cuba", "Chile", "Denmark", "Finland", "Hungary", "Brazil", "Mexico"]
languages = ["Germany", "Italy", "Japan", "China", "Russia", "Portugal", "Egypt", "the Netherlands", "Sweden",
             "Argentina", "Greece", "Turkey", "Poland", "Spain", "Canada", "Australia"]
symbols = ["iron", "silver", "sodium", "carbon", "hydrogen", "nitrogen", "helium", "copper", "calcium",
           "potassium", "lead", "table salt"]
counts = ["legs does a dog have", "legs does an insect have", "legs does a bird have", "arms does an octopus have",
          "sides does a square have", "sides does a hexagon have", "sides does a pentagon have",
          "minutes are there in an hour", "seconds are there in a minute", "days are there in a year",
          "continents are there", "planets are in our solar system", "wheels does a bicycle have",
          "wheels does a car have", "players are on a soccer team", "weeks are there in a year",
          "letters are in the English alphabet", "strings does a violin have", "cents are in a dollar"]
facts = ["What is the smallest planet in our solar system?", "What is the closest star to Earth?",
         "What is the hardest natural substance?", "At what temperature in Celsius does water freeze?",
         "Who discovered penicillin?", "Who invented the telephone?", "Who was the first person to walk on the Moon?",
         "What is the tallest mountain in the world?", "What is the largest desert in the world?",
         "What is the fastest land animal?", "What is the tallest animal?", "What color is grass?",
         "What color are ripe bananas?", "What do cows give us?", "What is the main gas in the air we breathe?",
         "Which planet is closest to the Sun?", "What is the capital city of the United States?",
         "Who wrote Pride and Prejudice?", "Who painted The Starry Night?", "Who developed the theory of relativity?",
         "What is the largest continent?",
         "What is the largest country by area?", "What instrument has 88 keys?", "What do caterpillars turn into?",
         "What is frozen water called?", "How many bones are in the adult human body?",
         "What organ pumps blood through the body?", "What is the largest organ of the human body?",
         "Which animal is known as the king of the jungle?"]
definitions = [f"What is the opposite of {w}?" for w in ["fast", "old", "happy", "open", "wet", "light", "tall",
               "early", "full", "left", "loud", "hard", "rich", "young", "in", "near", "before", "win"]]
definitions += [f"What is the plural of {w}?" for w in ["tooth", "goose", "woman", "man", "person", "sheep", "leaf",
                "knife", "cactus", "box"]]
definitions += [f"What is the past tense of {w}?" for w in ["eat", "see", "run", "swim", "write", "take", "buy",
                "sing", "come", "think"]]
definitions += [f"What is {w}?" for w in ["a river", "a desert", "an island", "a bridge", "a planet", "a guitar",
                "a violin", "a hospital", "a library", "a telescope", "a microscope", "a calendar", "a dictionary",
                "an orange", "a carrot", "a rainbow", "an earthquake", "a glacier", "an adjective", "an adverb",
                "a sentence", "a square", "a circle", "a reptile", "a bird", "an insect", "a fish", "evaporation",
                "a magnet", "electricity", "a democracy", "an atom", "a cloud", "a habitat"]]
definitions += [f"What does {w} do?" for w in ["a teacher", "a farmer", "a pilot", "a firefighter", "a chef",
                "a dentist", "a nurse", "a police officer", "a baker", "a librarian", "an architect", "a mechanic"]]
definitions += [f"What does {w} measure?" for w in ["a ruler", "a clock", "a scale", "a barometer",
                "a speedometer", "a compass show"]]
instructions = [f"Name {w}." for w in ["a fruit", "a vegetable", "a musical instrument", "a country in Europe",
                "a country in Asia", "a country in Africa", "a country in South America", "a planet",
                "a month of the year", "a farm animal", "a bird", "a sport", "a shape", "a metal", "a tree",
                "a flower", "a body part", "an insect", "a mammal", "a vehicle", "a kitchen tool", "a continent"]]
instructions += ["Say thank you in French.", "Say thank you in Spanish.", "Say goodbye in Spanish.",
                 "Say good morning in German.", "Translate 'cat' into Spanish.", "Translate 'water' into French.",
                 "Translate 'house' into Spanish.", "Translate 'book' into French.", "Translate 'dog' into German.",
                 "Complete the sentence: Actions speak louder than", "Complete the sentence: Practice makes",
                 "Complete the sentence: Better late than", "Complete the sentence: An apple a day keeps the",
                 "Complete the sentence: Every cloud has a silver", "Complete the sentence: Two heads are better than",
                 "List three animals.", "List three fruits.", "List three countries.", "List three musical instruments.",
                 "Count from one to five.", "Spell the word cat backwards.", "Give a word that rhymes with cat.",
                 "Give a synonym for happy.", "Write a sentence using the word blue.", "Name two oceans."]
random.seed(1337)
evaluated = {(2, 2), (3, 4), (5, 5), (2, 3), (6, 7), (3, 3), (4, 2), (10, 10)}  # its sums, products, 8/2, 100/10
pairs = [(a, b) for a, b in itertools.product(range(2, 13), repeat=2) if (a, b) not in evaluated and (b, a) not in evaluated]
arithmetic = [f"What is {a} plus {b}?" for a, b in random.sample(pairs, 20)]
arithmetic += [f"What is {a} times {b}?" for a, b in random.sample(pairs, 20)]
arithmetic += [f"What is {a + b} minus {b}?" for a, b in random.sample(pairs, 12)]
arithmetic += [f"What is {a * b} divided by {b}?" for a, b in random.sample(pairs, 12)]
arithmetic += [f"What is double {a}?" for a in range(3, 13)] + [f"What is half of {2 * a}?" for a in [3, 4, 6, 7, 8, 9, 12, 15]]  # not of 10
questions = ([f"What is the capital of {c}?" for c in capitals] + [f"What language is spoken in {c}?" for c in languages]
             + [f"What is the chemical symbol for {e}?" for e in symbols] + [f"How many {c}?" for c in counts] + facts
             + definitions + instructions + arithmetic)
evaluation = json.load(open(os.path.join(os.path.dirname(__file__), "..", "..", "..", "data", "chat_questions.json")))
asked = {q["question"].lower() for q in evaluation}
assert not asked & {q.lower() for q in questions} and len(set(questions)) == len(questions)
print("\n".join(questions))
