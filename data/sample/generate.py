"""Generate the bundled sample data: a small English corpus, its WordPiece vocab, and an SST-2 task.

    python -m data.sample.generate            # rewrites the files next to this script
    python -m data.sample.generate --out DIR  # writes them into DIR instead

Nothing can be downloaded here, so the demo's text is made by a small templated grammar. Fixed
seed, so the committed files are exactly what this script writes. What it makes:

``corpus.txt``
    Pre-training text in the one-sentence-per-line format, a blank line between documents.
    Three kinds of documents: biographies of people, descriptions of cities, and reviews of films
    and books. Each document follows one entity through a fixed order of facts, so both BERT
    tasks have something to learn: masked words are predictable from their context (a city's
    country and river, a person's pronoun and name, "born in", "studied ... at"), and the true
    next sentence is about the same entity and comes next in the story, while a random one is
    about another entity.
``vocab.txt``
    A WordPiece vocab trained on ``corpus.txt`` with the ``tokenizers`` library (lower-cased,
    BERT normalizer and pre-tokenizer), ``[PAD]`` first (id 0), then ``[UNK] [CLS] [SEP] [MASK]``.
    The trainer breaks ties between equally frequent merges in no fixed order, so a rerun may
    pick a few different word pieces; the corpus and the task files are reproduced exactly.
``glue/SST-2/train.tsv``, ``glue/SST-2/dev.tsv``
    A sentiment task in GLUE's SST-2 layout (header ``sentence<TAB>label``, lower-cased text with
    spaced punctuation like the real SST-2). A review sentence is positive (1) or negative (0) by
    its sentiment words; in some, "but" joins two opinions and the second one decides, so a model
    has to read more than one word.
"""

from __future__ import annotations

import argparse
import os
import random

SEED = 20240601
NUM_PEOPLE = 180
NUM_CITIES = 40
NUM_REVIEWS = 160
NUM_SST_TRAIN = 480
NUM_SST_DEV = 120
VOCAB_SIZE = 1200

FIRST_NAMES = {
    "she": """Ada Alice Anna Beatrice Clara Dora Edith Elena Emma Eva Freya Greta Helen Ida Irene
              Julia Laura Lena Lucia Maria Marta Nina Olga Rosa Sara Sofia Tilda Vera Wilma
              Yara""".split(),
    "he": """Adam Albert Anton Bruno Carl Daniel Emil Felix Georg Hugo Ivan Jakob Karl Leo Lukas
             Marco Martin Max Niko Oscar Otto Paul Peter Rafael Simon Tomas Victor Walter Yann
             Zoran""".split(),
}
LAST_NAMES = """Albers Berg Brandt Castell Dahl Eklund Falk Ferreira Grimm Hale Holm Ivers Jansen
                Keller Kovac Lind Lorenz Marten Moreau Nagel Novak Olsen Petrov Quist Rossi Sandberg
                Silva Strand Toivonen Urban Vidal Weber Wolff Young Zeller""".split()
COUNTRIES = {
    "France": ["Lyon", "Nantes", "Rouen", "Dijon", "Reims"],
    "Norway": ["Oslo", "Bergen", "Tromso", "Bodo"],
    "Italy": ["Turin", "Verona", "Parma", "Genoa", "Siena"],
    "Spain": ["Seville", "Bilbao", "Malaga", "Toledo"],
    "Poland": ["Krakow", "Gdansk", "Poznan", "Lublin"],
    "Sweden": ["Uppsala", "Malmo", "Lund", "Umea"],
    "Portugal": ["Porto", "Braga", "Coimbra", "Faro"],
    "Austria": ["Graz", "Linz", "Salzburg", "Innsbruck"],
    "Greece": ["Patras", "Larissa", "Volos", "Chania"],
    "Canada": ["Halifax", "Regina", "Quebec", "Calgary"],
}
RIVERS = """Alder Birch Cedar Elm Fern Hazel Linden Maple Oak Rowan Willow Yew""".split()
LANDMARKS = ["old bridge", "stone cathedral", "botanical garden", "harbour", "clock tower",
             "city museum", "market hall", "opera house", "castle", "university library"]
FESTIVALS = ["music", "film", "poetry", "dance", "theatre", "jazz", "lights", "food"]
MONTHS = """January February March April May June July August September October November
            December""".split()
SUBJECTS = ["chemistry", "physics", "history", "medicine", "law", "music", "architecture",
            "mathematics", "biology", "painting", "philosophy", "economics"]
PROFESSIONS = {  # subject -> the profession it leads to
    "chemistry": "chemist", "physics": "physicist", "history": "historian",
    "medicine": "doctor", "law": "lawyer", "music": "composer", "architecture": "architect",
    "mathematics": "mathematician", "biology": "biologist", "painting": "painter",
    "philosophy": "philosopher", "economics": "economist",
}
HOBBIES = ["swimming", "chess", "drawing", "sailing", "reading", "climbing", "singing",
           "gardening", "cycling", "fishing"]
POSITIVE = ["wonderful", "brilliant", "moving", "delightful", "charming", "beautiful",
            "excellent", "touching", "clever", "gripping", "warm", "superb"]
NEGATIVE = ["dull", "boring", "clumsy", "tedious", "awful", "shallow", "tiresome", "bland",
            "confusing", "weak", "lifeless", "dreadful"]
ASPECTS = ["story", "acting", "music", "ending", "dialogue", "camera work", "plot", "cast",
           "script", "pacing"]
WORK_KINDS = ["film", "book", "play", "novel", "documentary"]
NUMBER_WORDS = ["no", "one", "two", "three", "four", "five"]


def _a(word: str) -> str:
    """``word`` with its indefinite article: "a chemist", "an architect"."""
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def _cities() -> list[tuple[str, str]]:
    return [(city, country) for country, cities in COUNTRIES.items() for city in cities]


def _city_facts(rng: random.Random) -> dict[str, dict]:
    facts = {}
    for city, country in _cities():
        facts[city] = {"country": country, "river": rng.choice(RIVERS),
                       "landmark": rng.choice(LANDMARKS), "festival": rng.choice(FESTIVALS),
                       "month": rng.choice(MONTHS),
                       "people": rng.choice(["about fifty thousand", "about one hundred thousand",
                                             "about half a million", "more than a million"])}
    return facts


def _person(rng: random.Random, facts: dict) -> list[str]:
    pronoun = rng.choice(["she", "he"])
    poss = "her" if pronoun == "she" else "his"
    first, last = rng.choice(FIRST_NAMES[pronoun]), rng.choice(LAST_NAMES)
    name = f"{first} {last}"
    born_city, study_city, work_city = (rng.choice(list(facts)) for _ in range(3))
    born = rng.randint(1850, 1980)
    subject = rng.choice(SUBJECTS)
    profession = PROFESSIONS[subject]
    P = pronoun.capitalize()
    s = [f"{name} was born in {born_city} in {born}.",
         f"{born_city} is a city in {facts[born_city]['country']} on the "
         f"{facts[born_city]['river']} river.",
         f"As a child, {pronoun} loved {rng.choice(HOBBIES)} and {rng.choice(HOBBIES)}.",
         f"{P} studied {subject} at the university of {study_city}.",
         f"After {poss} studies, {pronoun} worked as {_a(profession)} in {work_city}."]
    if rng.random() < 0.6:
        spouse_pronoun = rng.choice(["she", "he"])
        spouse = f"{rng.choice(FIRST_NAMES[spouse_pronoun])} {rng.choice(LAST_NAMES)}"
        job = PROFESSIONS[rng.choice(SUBJECTS)]
        s.append(f"In {born + rng.randint(22, 35)}, {pronoun} married {spouse}, {_a(job)} from "
                 f"{rng.choice(list(facts))}.")
        s.append(f"They had {rng.choice(NUMBER_WORDS)} children.")
    if rng.random() < 0.7:
        year = born + rng.randint(30, 50)
        kind = rng.choice(["book", "novel"])
        adjective = rng.choice(POSITIVE + NEGATIVE)
        s.append(f"In {year}, {last} wrote {_a(kind)} about {rng.choice(SUBJECTS)}.")
        s.append(f"Critics called the {kind} {adjective}.")
    if rng.random() < 0.5:
        s.append(f"{P} later returned to {born_city} and taught {subject} there.")
    s.append(f"{last} died in {rng.choice(list(facts))} in {born + rng.randint(55, 95)}.")
    return s


def _city(city: str, f: dict, rng: random.Random) -> list[str]:
    s = [f"{city} is a city in {f['country']}.",
         f"It lies on the {f['river']} river.",
         f"{f['people'].capitalize()} people live in {city}.",
         f"The city is known for its {f['landmark']}.",
         f"Every {f['month']}, {city} holds a festival of {f['festival']}.",
         f"Visitors often call the festival {rng.choice(POSITIVE)}."]
    if rng.random() < 0.5:
        s.append(f"The {f['landmark']} was built in {rng.randint(1200, 1950)}.")
    if rng.random() < 0.5:
        s.append(f"Many students come to {city} to study {rng.choice(SUBJECTS)}.")
    s.append(f"The {f['river']} river flows from {city} to the sea.")
    return s


def _review(rng: random.Random, facts: dict) -> list[str]:
    kind = rng.choice(WORK_KINDS)
    pronoun = rng.choice(["she", "he"])
    author = f"{rng.choice(FIRST_NAMES[pronoun])} {rng.choice(LAST_NAMES)}"
    title = f"The {rng.choice(['Last', 'Silent', 'Red', 'Long', 'Quiet', 'Lost'])} " \
            f"{rng.choice(['Summer', 'River', 'Winter', 'Garden', 'Letter', 'Road'])}"
    city = rng.choice(list(facts))
    positive = rng.random() < 0.5
    words = POSITIVE if positive else NEGATIVE
    s = [f"{title} is {_a(kind)} by {author}.",
         f"It came out in {rng.randint(1920, 2020)}.",
         f"The {kind} follows {_a(PROFESSIONS[rng.choice(SUBJECTS)])} from {city}.",
         f"The {rng.choice(ASPECTS)} is {rng.choice(words)}.",
         f"The {rng.choice(ASPECTS)} is {rng.choice(words)} and {rng.choice(words)}.",
         f"Critics called the {kind} {rng.choice(words)}."]
    if rng.random() < 0.5:
        s.append(f"Most readers agreed that it was {rng.choice(words)}." if kind in
                 ("book", "novel") else f"Most viewers agreed that it was {rng.choice(words)}.")
    s.append(f"{author} was born in {city}.")
    return s


def make_corpus(rng: random.Random) -> list[list[str]]:
    """The documents of ``corpus.txt``, each a list of sentences, in a shuffled order."""
    facts = _city_facts(rng)
    docs = [_person(rng, facts) for _ in range(NUM_PEOPLE)]
    docs += [_city(city, facts[city], rng) for city in rng.sample(list(facts), NUM_CITIES)]
    docs += [_review(rng, facts) for _ in range(NUM_REVIEWS)]
    rng.shuffle(docs)
    return docs


def _sst_sentence(rng: random.Random, label: int) -> str:
    kind = rng.choice(WORK_KINDS)
    good, bad = (POSITIVE, NEGATIVE) if label == 1 else (NEGATIVE, POSITIVE)
    form = rng.random()
    if form < 0.35:
        text = f"the {rng.choice(ASPECTS)} is {rng.choice(bad)} , but the {kind} is " \
               f"{rng.choice(good)} ."
    elif form < 0.7:
        text = f"{_a(rng.choice(good))} {kind} about {_a(PROFESSIONS[rng.choice(SUBJECTS)])} " \
               f"from {rng.choice(_cities())[0].lower()} ."
    else:
        text = f"the {rng.choice(ASPECTS)} is {rng.choice(good)} and the " \
               f"{rng.choice(ASPECTS)} is {rng.choice(good)} ."
    return text.lower()


def make_sst(rng: random.Random, n: int, exclude: set[str] = frozenset()
             ) -> list[tuple[str, int]]:
    """``n`` distinct labelled sentences, half of each label, none of them in ``exclude``."""
    labels = [i % 2 for i in range(n)]
    rng.shuffle(labels)
    rows, seen = [], set(exclude)
    for y in labels:
        sentence = _sst_sentence(rng, y)
        while sentence in seen:
            sentence = _sst_sentence(rng, y)
        seen.add(sentence)
        rows.append((sentence, y))
    return rows


def train_vocab(corpus_path: str, out_dir: str) -> str:
    """Train the WordPiece vocab on ``corpus_path``; returns the written ``vocab.txt``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        show_progress=False)
    tokenizer.train([corpus_path], trainer)
    vocab = tokenizer.get_vocab()
    path = os.path.join(out_dir, "vocab.txt")
    with open(path, "w", encoding="utf-8") as f:
        for token, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
            f.write(token + "\n")
    return path


def generate(out_dir: str) -> None:
    rng = random.Random(SEED)
    os.makedirs(out_dir, exist_ok=True)
    corpus_path = os.path.join(out_dir, "corpus.txt")
    with open(corpus_path, "w", encoding="utf-8") as f:
        f.write("\n\n".join("\n".join(doc) for doc in make_corpus(rng)) + "\n")
    train_vocab(corpus_path, out_dir)
    sst_dir = os.path.join(out_dir, "glue", "SST-2")
    os.makedirs(sst_dir, exist_ok=True)
    train = make_sst(rng, NUM_SST_TRAIN)
    dev = make_sst(rng, NUM_SST_DEV, exclude={s for s, _ in train})  # no train sentence in dev
    for split, rows in (("train", train), ("dev", dev)):
        with open(os.path.join(sst_dir, f"{split}.tsv"), "w", encoding="utf-8") as f:
            f.write("sentence\tlabel\n")
            for sentence, label in rows:
                f.write(f"{sentence}\t{label}\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)),
                   help="output directory (default: next to this script)")
    generate(p.parse_args().out)


if __name__ == "__main__":
    main()
