"""Write the real-text pool and targets of benchmarks/data/realtext/ (deterministic; rerun to regenerate).

Every example is built from a real English fact or word form listed below (capitals, irregular and
regular past tenses, antonyms, plurals, everyday science facts, definitions, small talk), phrased by a
few templates. Pool and targets share the skills but not the items: each target's items (countries,
verbs, word pairs) are kept out of the pool, so a selection must find the skill, not the answer.

    .venv/bin/python benchmarks/data/make_realtext.py
"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "realtext"

CAPITALS = {
    "europe": [
        ("France", "Paris"),
        ("Germany", "Berlin"),
        ("Italy", "Rome"),
        ("Spain", "Madrid"),
        ("Portugal", "Lisbon"),
        ("Poland", "Warsaw"),
        ("Austria", "Vienna"),
        ("Greece", "Athens"),
        ("Sweden", "Stockholm"),
        ("Norway", "Oslo"),
        ("Finland", "Helsinki"),
        ("Denmark", "Copenhagen"),
        ("Ireland", "Dublin"),
        ("Hungary", "Budapest"),
        ("Belgium", "Brussels"),
        ("Czechia", "Prague"),
        ("Romania", "Bucharest"),
        ("Switzerland", "Bern"),
    ],
    "asia": [
        ("Japan", "Tokyo"),
        ("China", "Beijing"),
        ("India", "New Delhi"),
        ("Thailand", "Bangkok"),
        ("Vietnam", "Hanoi"),
        ("Indonesia", "Jakarta"),
        ("Nepal", "Kathmandu"),
        ("Mongolia", "Ulaanbaatar"),
        ("Iran", "Tehran"),
        ("Iraq", "Baghdad"),
        ("Pakistan", "Islamabad"),
        ("Bangladesh", "Dhaka"),
        ("Philippines", "Manila"),
        ("Malaysia", "Kuala Lumpur"),
        ("South Korea", "Seoul"),
        ("Afghanistan", "Kabul"),
    ],
    "africa": [
        ("Egypt", "Cairo"),
        ("Kenya", "Nairobi"),
        ("Nigeria", "Abuja"),
        ("Ghana", "Accra"),
        ("Ethiopia", "Addis Ababa"),
        ("Morocco", "Rabat"),
        ("Senegal", "Dakar"),
        ("Uganda", "Kampala"),
        ("Algeria", "Algiers"),
        ("Tunisia", "Tunis"),
        ("Zimbabwe", "Harare"),
        ("Angola", "Luanda"),
        ("Mali", "Bamako"),
        ("Sudan", "Khartoum"),
    ],
    "americas": [
        ("Canada", "Ottawa"),
        ("Mexico", "Mexico City"),
        ("Brazil", "Brasilia"),
        ("Argentina", "Buenos Aires"),
        ("Peru", "Lima"),
        ("Chile", "Santiago"),
        ("Colombia", "Bogota"),
        ("Cuba", "Havana"),
        ("Venezuela", "Caracas"),
        ("Ecuador", "Quito"),
        ("Uruguay", "Montevideo"),
        ("Bolivia", "Sucre"),
        ("Jamaica", "Kingston"),
        ("Paraguay", "Asuncion"),
    ],
}

IRREGULAR = [
    ("go", "went"),
    ("eat", "ate"),
    ("see", "saw"),
    ("take", "took"),
    ("give", "gave"),
    ("write", "wrote"),
    ("drive", "drove"),
    ("speak", "spoke"),
    ("break", "broke"),
    ("choose", "chose"),
    ("freeze", "froze"),
    ("ride", "rode"),
    ("rise", "rose"),
    ("sing", "sang"),
    ("drink", "drank"),
    ("swim", "swam"),
    ("begin", "began"),
    ("run", "ran"),
    ("come", "came"),
    ("know", "knew"),
    ("grow", "grew"),
    ("throw", "threw"),
    ("fly", "flew"),
    ("draw", "drew"),
    ("buy", "bought"),
    ("bring", "brought"),
    ("think", "thought"),
    ("teach", "taught"),
    ("catch", "caught"),
    ("fight", "fought"),
    ("sell", "sold"),
    ("tell", "told"),
    ("find", "found"),
    ("stand", "stood"),
    ("sit", "sat"),
    ("lose", "lost"),
    ("feel", "felt"),
    ("keep", "kept"),
    ("sleep", "slept"),
    ("leave", "left"),
    ("meet", "met"),
    ("send", "sent"),
    ("spend", "spent"),
    ("build", "built"),
    ("hold", "held"),
    ("make", "made"),
]
REGULAR = [
    ("walk", "walked"),
    ("play", "played"),
    ("jump", "jumped"),
    ("cook", "cooked"),
    ("clean", "cleaned"),
    ("open", "opened"),
    ("watch", "watched"),
    ("help", "helped"),
    ("call", "called"),
    ("ask", "asked"),
    ("work", "worked"),
    ("talk", "talked"),
    ("paint", "painted"),
    ("visit", "visited"),
    ("listen", "listened"),
    ("answer", "answered"),
    ("carry", "carried"),
    ("study", "studied"),
    ("try", "tried"),
    ("cry", "cried"),
    ("stop", "stopped"),
    ("plan", "planned"),
    ("move", "moved"),
    ("dance", "danced"),
    ("smile", "smiled"),
    ("close", "closed"),
    ("hope", "hoped"),
    ("laugh", "laughed"),
    ("wash", "washed"),
    ("climb", "climbed"),
    ("push", "pushed"),
    ("pull", "pulled"),
    ("rain", "rained"),
    ("start", "started"),
    ("finish", "finished"),
    ("learn", "learned"),
]

ANTONYMS = {
    "adjective": [
        ("hot", "cold"),
        ("big", "small"),
        ("tall", "short"),
        ("fast", "slow"),
        ("happy", "sad"),
        ("old", "new"),
        ("rich", "poor"),
        ("early", "late"),
        ("light", "dark"),
        ("heavy", "light"),
        ("strong", "weak"),
        ("easy", "difficult"),
        ("full", "empty"),
        ("wet", "dry"),
        ("clean", "dirty"),
        ("loud", "quiet"),
        ("hard", "soft"),
        ("young", "old"),
        ("thick", "thin"),
        ("wide", "narrow"),
        ("deep", "shallow"),
        ("cheap", "expensive"),
        ("safe", "dangerous"),
        ("sweet", "sour"),
        ("brave", "cowardly"),
        ("true", "false"),
        ("open", "closed"),
        ("high", "low"),
    ],
    "verb_or_noun": [
        ("win", "lose"),
        ("buy", "sell"),
        ("push", "pull"),
        ("arrive", "leave"),
        ("open", "close"),
        ("love", "hate"),
        ("remember", "forget"),
        ("begin", "end"),
        ("accept", "refuse"),
        ("laugh", "cry"),
        ("day", "night"),
        ("friend", "enemy"),
        ("question", "answer"),
        ("north", "south"),
        ("east", "west"),
        ("summer", "winter"),
        ("beginning", "end"),
        ("war", "peace"),
        ("entrance", "exit"),
        ("success", "failure"),
    ],
}

PLURALS = [
    ("child", "children"),
    ("mouse", "mice"),
    ("foot", "feet"),
    ("tooth", "teeth"),
    ("man", "men"),
    ("woman", "women"),
    ("person", "people"),
    ("goose", "geese"),
    ("knife", "knives"),
    ("leaf", "leaves"),
    ("wolf", "wolves"),
    ("city", "cities"),
    ("baby", "babies"),
    ("box", "boxes"),
    ("bus", "buses"),
    ("dish", "dishes"),
    ("church", "churches"),
    ("potato", "potatoes"),
    ("tomato", "tomatoes"),
    ("book", "books"),
    ("car", "cars"),
    ("tree", "trees"),
    ("house", "houses"),
    ("apple", "apples"),
    ("cat", "cats"),
    ("dog", "dogs"),
    ("girl", "girls"),
    ("boy", "boys"),
    ("key", "keys"),
    ("day", "days"),
    ("sheep", "sheep"),
    ("fish", "fish"),
    ("deer", "deer"),
    ("cactus", "cacti"),
    ("life", "lives"),
    ("wife", "wives"),
]

SCIENCE = [
    ("What gas do plants take in from the air?", "Plants take in carbon dioxide."),
    ("What gas do people need to breathe?", "People need oxygen to breathe."),
    ("At what temperature does water freeze in Celsius?", "Water freezes at zero degrees Celsius."),
    ("At what temperature does water boil in Celsius?", "Water boils at one hundred degrees Celsius."),
    ("What is the closest star to the Earth?", "The Sun is the closest star to the Earth."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("How many legs does an insect have?", "An insect has six legs."),
    ("What planet is known as the red planet?", "Mars is known as the red planet."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet."),
    ("What force pulls objects toward the Earth?", "Gravity pulls objects toward the Earth."),
    ("What do bees make?", "Bees make honey."),
    ("Which organ pumps blood through the body?", "The heart pumps blood through the body."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("How many hours are in a day?", "There are twenty four hours in a day."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean."),
    ("What do caterpillars turn into?", "Caterpillars turn into butterflies."),
    ("Which animal is the largest mammal?", "The blue whale is the largest mammal."),
    ("What does the Moon orbit?", "The Moon orbits the Earth."),
    ("What gives plants their green color?", "Chlorophyll gives plants their green color."),
    ("How many continents are there?", "There are seven continents."),
    ("What is the main gas in the air we breathe?", "Nitrogen is the main gas in the air."),
    ("What do we call animals that eat only plants?", "Animals that eat only plants are herbivores."),
    ("What is the hardest natural material?", "Diamond is the hardest natural material."),
    ("Where does the Sun rise?", "The Sun rises in the east."),
    ("What melts ice faster, salt or sand?", "Salt melts ice faster."),
    ("How many bones does an adult human have?", "An adult human has two hundred and six bones."),
    ("What shape is the Earth?", "The Earth is nearly a sphere."),
]

DEFINITIONS = [
    ("library", "A library is a place where books are kept for people to read or borrow."),
    ("bakery", "A bakery is a shop where bread and cakes are made and sold."),
    ("hospital", "A hospital is a place where sick or injured people are treated."),
    ("bridge", "A bridge is a structure that carries a road or path across a river or valley."),
    ("island", "An island is a piece of land surrounded by water."),
    ("desert", "A desert is a dry area of land that gets very little rain."),
    ("forest", "A forest is a large area covered with trees."),
    ("calendar", "A calendar is a chart that shows the days, weeks and months of a year."),
    ("umbrella", "An umbrella is a folding cover that protects you from rain."),
    ("dictionary", "A dictionary is a book that lists words and explains their meanings."),
    ("teacher", "A teacher is a person who helps others learn."),
    ("farmer", "A farmer is a person who grows crops or raises animals."),
    ("river", "A river is a large stream of water that flows to the sea."),
    ("mountain", "A mountain is a very high hill."),
    ("kitchen", "A kitchen is a room where food is prepared and cooked."),
    ("airport", "An airport is a place where planes take off and land."),
    ("museum", "A museum is a building where interesting objects are kept and shown."),
    ("volcano", "A volcano is a mountain that can throw out hot melted rock."),
    ("recipe", "A recipe is a set of instructions for cooking a dish."),
    ("passport", "A passport is an official document that lets you travel to other countries."),
    ("thermometer", "A thermometer is a tool that measures temperature."),
    ("map", "A map is a drawing of an area that shows where places are."),
    ("clock", "A clock is a device that shows the time."),
    ("garden", "A garden is a piece of land where flowers or vegetables are grown."),
]

CHITCHAT = [
    ("Hello, how are you today?", "I am doing well, thank you for asking."),
    ("Good morning!", "Good morning to you too. I hope you have a nice day."),
    ("Thank you for your help.", "You are welcome. I am glad I could help."),
    ("What is your favorite season?", "I like spring, when the flowers start to bloom."),
    ("Can you recommend a good book?", "Many people enjoy reading a classic novel on a quiet evening."),
    ("I feel tired today.", "I am sorry to hear that. A short rest might help you feel better."),
    ("What should I cook for dinner?", "A simple soup with fresh vegetables is a good choice."),
    ("It is raining outside.", "Then it is a good day to stay inside with a warm drink."),
    ("Do you like music?", "Yes, music can make any day brighter."),
    ("Tell me something nice.", "You are doing better than you think."),
    ("I have a job interview tomorrow.", "Good luck. Prepare a little and get some sleep tonight."),
    ("What is a good way to relax?", "A walk in the park is a good way to relax."),
    ("See you later!", "See you later. Take care."),
    ("I just finished my exams.", "Congratulations on finishing your exams."),
    ("What time is it?", "I cannot see a clock, but your phone will tell you the time."),
    ("I like playing football.", "Football is a great way to stay active with friends."),
    ("My cat is sleeping on my bed.", "Cats love to find a warm and soft place to sleep."),
    ("I am learning to cook.", "That is wonderful. Start with simple dishes and practice often."),
    ("Where should I travel this summer?", "A trip to the seaside is a lovely way to spend the summer."),
    ("Happy birthday to my friend!", "Happy birthday to your friend. I hope the day is full of joy."),
]

SENTENCES = [
    ("She walks to school.", "She walked to school."),
    ("They play in the park.", "They played in the park."),
    ("He eats an apple.", "He ate an apple."),
    ("We go to the market.", "We went to the market."),
    ("I write a letter.", "I wrote a letter."),
    ("The dog runs fast.", "The dog ran fast."),
    ("My mother cooks dinner.", "My mother cooked dinner."),
    ("The children sing a song.", "The children sang a song."),
    ("He drinks milk.", "He drank milk."),
    ("The bird flies away.", "The bird flew away."),
    ("I see a rainbow.", "I saw a rainbow."),
    ("She buys a new dress.", "She bought a new dress."),
    ("They build a house.", "They built a house."),
    ("The baby sleeps well.", "The baby slept well."),
    ("We watch a movie.", "We watched a movie."),
    ("He teaches math.", "He taught math."),
    ("The sun rises early.", "The sun rose early."),
    ("I find my keys.", "I found my keys."),
    ("She tells a story.", "She told a story."),
    ("The train leaves at noon.", "The train left at noon."),
]


def _rows(source, pairs):
    return [
        {"dataset": source, "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in pairs
    ]


def main() -> None:
    rng = random.Random(0)
    pool: list[dict] = []
    targets: dict[str, list[dict]] = {"capitals": [], "past_tense": [], "antonyms": []}
    # Each target keeps a third of each subtask's items out of the pool, asked with its own template.
    for continent, items in CAPITALS.items():
        items = items[:]
        rng.shuffle(items)
        held, rest = items[: len(items) // 3], items[len(items) // 3 :]
        targets["capitals"] += [
            {"prompt": f"Name the capital city of {c}.", "completion": f"{k}.", "subtask": continent} for c, k in held
        ]
        pool += _rows("capitals", [(f"What is the capital of {c}?", f"The capital of {c} is {k}.") for c, k in rest])
        pool += _rows(
            "capitals", [(f"Which city is the capital of {c}?", f"{k} is the capital of {c}.") for c, k in rest]
        )
    for subtask, items in (("irregular", IRREGULAR), ("regular", REGULAR)):
        items = items[:]
        rng.shuffle(items)
        held, rest = items[: len(items) // 3], items[len(items) // 3 :]
        targets["past_tense"] += [
            {"prompt": f"Give the simple past of '{v}'.", "completion": p, "subtask": subtask} for v, p in held
        ]
        pool += _rows(
            "past_tense",
            [(f"What is the past tense of the verb '{v}'?", f"The past tense of '{v}' is '{p}'.") for v, p in rest],
        )
        pool += _rows("past_tense", [(f"Yesterday I ... ({v})", f"Yesterday I {p}.") for v, p in rest])
    for subtask, items in ANTONYMS.items():
        items = items[:]
        rng.shuffle(items)
        held, rest = items[: len(items) // 3], items[len(items) // 3 :]
        targets["antonyms"] += [
            {"prompt": f"Give a word that means the opposite of '{w}'.", "completion": o, "subtask": subtask}
            for w, o in held
        ]
        pool += _rows(
            "antonyms", [(f"What is the opposite of '{w}'?", f"The opposite of '{w}' is '{o}'.") for w, o in rest]
        )
        pool += _rows("antonyms", [(f"Antonym of {w}:", o) for w, o in rest])
    pool += _rows("plurals", [(f"What is the plural of '{s}'?", f"The plural of '{s}' is '{p}'.") for s, p in PLURALS])
    pool += _rows("plurals", [(f"One {s}, two ...", f"Two {p}.") for s, p in PLURALS])
    pool += _rows("science", SCIENCE)
    pool += _rows("science", [(f"Answer in one sentence: {q}", a) for q, a in SCIENCE])
    pool += _rows("definitions", [(f"What is a {w}?", d) for w, d in DEFINITIONS])
    pool += _rows("definitions", [(f"Define the word '{w}'.", d) for w, d in DEFINITIONS])
    pool += _rows("chitchat", CHITCHAT)
    pool += _rows("chitchat", [(f"{q} Please answer kindly.", a) for q, a in CHITCHAT])
    pool += _rows("rewrite", [(f"Rewrite in the past tense: {s}", p) for s, p in SENTENCES])
    pool += _rows("rewrite", [(f"Change this sentence to the past: {s}", p) for s, p in SENTENCES])
    rng.shuffle(pool)
    OUT.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(pool):
        row["id"] = f"rt-{i:04d}"
    (OUT / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pool), encoding="utf-8")
    for name, rows in targets.items():
        (OUT / f"target_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    counts: dict[str, int] = {}
    for r in pool:
        counts[r["dataset"]] = counts.get(r["dataset"], 0) + 1
    print(f"pool: {len(pool)} examples {counts}; targets: { ({k: len(v) for k, v in targets.items()}) }")


if __name__ == "__main__":
    main()
