"""OpenOrca-shaped examples for the benchmarks: generated records (`data_throughput.py` tokenizes them) and
their token lengths without a tokenizer (`train_throughput.py --lengths orca` trains on rows of those lengths).

Records: an OpenOrca-style system prompt in 5 of 6 (the template's default sentence otherwise), a question of
50-400 words, a response of 5-300 words, all words from common English. Their lengths in tokens follow the
data module with the `qlora` template: source = question and system words + 13 (template), target = response
words + 3 (separator, final period, EOS), cut to 384 / 128. Fitted with SmolLM2's tokenizer (no BOS), in which
these words are one token each: on 2,000 records the estimate is off by 2 tokens on average (8 at most), and the
lengths after the cuts have the encoder's distribution (mean 357, quartiles 274 / 360 / 444, max 512).
"""

from __future__ import annotations

import random

WORDS = (
    "the of and to a in is it you that he was for on are with as his they be at one have this from or had by "
    "word but what some we can out other were all there when up use your how said an each she which do their "
    "time if will way about many then them write would like so these her long make thing see him two has look "
    "more day could go come did number sound no most people my over know water than call first who may down "
    "side been now find any new work part take get place made live where after back little only round man year "
    "came show every good me give our under name very through just form sentence great think say help low line "
    "differ turn cause much mean before move right boy old too same tell does set three want air well also play "
    "small end put home read hand port large spell add even land here must big high such follow act why ask men "
    "change went light kind off need house picture try us again animal point mother world near build self earth "
    "father head stand own page should country found answer school grow study still learn plant cover food sun "
    "four between state keep eye never last let thought city tree cross farm hard start might story saw far sea "
    "draw left late run while press close night real life few north open seem together next white children begin "
    "got walk example ease paper group always music those both mark often letter until mile river car feet care "
    "second book carry took science eat room friend began idea fish mountain stop once base hear horse cut sure "
    "watch color face wood main enough plain girl usual young ready above ever red list though feel talk bird "
    "soon body dog family direct pose leave song measure door product black short numeral class wind question "
    "happen complete ship area half rock order fire south problem piece told knew pass since top whole king space "
    "heard best hour better true during hundred five remember step early hold west ground interest reach fast verb "
    "sing listen six table travel less morning ten simple several vowel toward war lay against pattern slow center "
    "translate summarize sentiment hypothesis premise therefore entailment article following options justify"
).split()
SYSTEMS = [
    "",
    "You are an AI assistant. User will give you a task. Your goal is to complete the task as faithfully as you "
    "can. While performing the task think step-by-step and justify your steps.",
    "You are a helpful assistant, who always provide explanation. Think like you are answering to a five year old.",
    "You are an AI assistant that helps people find information.",
    "Explain how you used the definition to come up with the answer.",
    "You are an AI assistant. You will be given a task. You must generate a detailed and long answer.",
]
DEFAULT_SYSTEM_WORDS = 23  # the `qlora` template's own system sentence, written when a record has none
SOURCE_EXTRA, TARGET_EXTRA = 13, 3  # tokens beyond one per word (see the module docstring)


def make_records(n: int, seed: int = 0) -> list[dict]:
    """`n` OpenOrca-shaped records: system prompt, a 50-400 word question, a 5-300 word response."""
    rng = random.Random(seed)

    def text(lo, hi):
        words = rng.choices(WORDS, k=rng.randint(lo, hi))
        return " ".join(words).capitalize() + "."

    return [
        {"id": f"bench.{i}", "system_prompt": rng.choice(SYSTEMS), "question": text(50, 400), "response": text(5, 300)}
        for i in range(n)
    ]


def example_lengths(n: int, source_max: int = 384, target_max: int = 128, seed: int = 0) -> list[int]:
    """Token counts of `n` OpenOrca-shaped examples as the data module keeps them (source and target cut to
    `source_max` / `target_max`), estimated from the word counts of `make_records(n, seed)`."""
    lengths = []
    for r in make_records(n, seed):
        system = len(r["system_prompt"].split()) or DEFAULT_SYSTEM_WORDS
        source = system + len(r["question"].split()) + SOURCE_EXTRA
        target = len(r["response"].split()) + TARGET_EXTRA
        lengths.append(min(source, source_max) + min(target, target_max))
    return lengths
