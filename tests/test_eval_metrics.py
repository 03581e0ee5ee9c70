"""Each evaluation metric on tiny random models against a direct computation."""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from distill.data.corpus import Document, split_of
from distill.models.tiny import tiny_llama_config
from eval.agreement import teacher_agreement
from eval.generation import (
    distinct_n,
    generate_continuations,
    repetition_rate,
    scored_perplexity,
)
from eval.heldout import generation_prompts, probe_paragraphs, split_sentences
from eval.perplexity import perplexity
from eval.probe import coherence_probe, probe_pairs, sequence_logprobs, shuffled_copy
from eval.retention import RETENTION, retention
from eval.speed import measure_speed, speed_ratios, time_generation

pytestmark = pytest.mark.usefixtures("one_thread")


def random_llama(seed: int, vocab_size: int = 256, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(
        tiny_llama_config(vocab_size=vocab_size, num_hidden_layers=layers)
    ).eval()


@pytest.fixture
def pair():
    return random_llama(0), random_llama(1)


def test_agreement_and_kl_match_direct_computation(pair):
    teacher, student = pair
    blocks = torch.randint(0, 256, (5, 24), generator=torch.Generator().manual_seed(0))
    got = teacher_agreement(teacher, student, blocks, batch_size=2)

    with torch.no_grad():
        log_pt = F.log_softmax(teacher(blocks).logits[:, :-1].double(), -1)
        log_ps = F.log_softmax(student(blocks).logits[:, :-1].double(), -1)
    agree = (log_pt.argmax(-1) == log_ps.argmax(-1)).double().mean().item()
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean().item()
    assert got["tokens"] == 5 * 23
    assert got["top1_agreement"] == pytest.approx(agree)
    assert got["kl_from_teacher"] == pytest.approx(kl, rel=1e-4)
    assert 0 < got["top1_agreement"] < 1 and got["kl_from_teacher"] > 0
    # the perplexities from the same pass equal eval.perplexity's
    for name, model in (("teacher", teacher), ("student", student)):
        ref = perplexity(model, blocks, batch_size=3, progress=False)["perplexity"]
        assert got[f"{name}_perplexity"] == pytest.approx(ref, rel=1e-4)


def test_agreement_with_itself_is_perfect(pair):
    teacher, _ = pair
    blocks = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    got = teacher_agreement(teacher, teacher, blocks)
    assert got["top1_agreement"] == 1.0
    assert got["kl_from_teacher"] == pytest.approx(0.0, abs=1e-6)


def test_sequence_logprobs_with_padding_match_single_sequences(pair):
    model, _ = pair
    sequences = [[5, 9, 13, 2, 7, 1], [4, 4], [100, 3, 200, 17]]
    got = sequence_logprobs(model, sequences, batch_size=3)
    for seq, value in zip(sequences, got, strict=True):
        with torch.no_grad():
            logp = F.log_softmax(model(torch.tensor([seq])).logits[0, :-1].double(), -1)
        manual = sum(logp[t, seq[t + 1]].item() for t in range(len(seq) - 1))
        assert value == pytest.approx(manual, abs=1e-3)


PARAGRAPHS = [
    [
        "The river rises in the hills.",
        "It flows south past the old mill.",
        "It joins the sea at Porth.",
    ],
    ["Anna was born in Riga.", "She studied music in Vienna.", "She later taught piano in Oslo."],
    ["The bridge opened in 1901.", "Floods damaged it in 1930.", "It was rebuilt two years later."],
    ["Copper is a soft metal.", "It conducts heat well.", "Pipes and wires are made from it."],
]


def compact(pairs):
    """Renumber the tokens of probe pairs into 0..K-1 so a model with a K-token vocabulary
    (fast to train) can read them; the order structure of every sequence is unchanged."""
    vocab = {t: i for i, t in enumerate(sorted({t for pair in pairs for seq in pair for t in seq}))}
    return [tuple([vocab[t] for t in seq] for seq in pair) for pair in pairs], len(vocab)


def overfit(model, seqs: list[list[int]], steps: int = 80) -> LlamaForCausalLM:
    """Train `model` to memorise the token sequences `seqs`."""
    length = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = labels[row, : len(seq)] = torch.tensor(seq)
    mask = (labels != -100).long()
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
    return model.eval()


def test_coherence_probe_follows_what_the_model_learned(tokenizer):
    """A model trained on the real order prefers it (probe = 1); one trained on the shuffled
    copies prefers those (probe = 0); the fraction equals a direct per-pair comparison."""
    real_pairs = probe_pairs(tokenizer, PARAGRAPHS, seed=3)
    for original, shuffled in real_pairs:
        assert original[0] == shuffled[0] == tokenizer.eos_token_id
        assert original != shuffled and sorted(original) != [] and len(original) > 10
    pairs, vocab_size = compact(real_pairs)

    def tiny():
        torch.manual_seed(0)
        return LlamaForCausalLM(tiny_llama_config(vocab_size=vocab_size, num_hidden_layers=2))

    knows_order = overfit(tiny(), [o for o, _ in pairs])
    knows_shuffle = overfit(tiny(), [s for _, s in pairs])
    assert coherence_probe(knows_order, pairs)["coherence_probe"] == 1.0
    assert coherence_probe(knows_shuffle, pairs)["coherence_probe"] == 0.0
    assert coherence_probe(knows_order, pairs)["coherence_margin"] > 0

    random_model = tiny().eval()
    got = coherence_probe(random_model, pairs, batch_size=3)
    direct = []
    for original, shuffle in pairs:
        o, s = (
            sequence_logprobs(random_model, [original]),
            sequence_logprobs(random_model, [shuffle]),
        )
        direct.append(o[0] - s[0])
    assert got["coherence_probe"] == sum(d > 0 for d in direct) / len(direct)
    assert got["coherence_margin"] == pytest.approx(sum(direct) / len(direct), abs=1e-3)


def test_shuffled_copy_always_differs_and_keeps_sentences():
    import random

    rng = random.Random(0)
    for sentences in PARAGRAPHS:
        for _ in range(10):
            perm = shuffled_copy(sentences, rng)
            assert perm != sentences and sorted(perm) == sorted(sentences)
    with pytest.raises(ValueError, match="all equal"):
        shuffled_copy(["Same.", "Same.", "Same."], rng)


def test_distinct_n_and_repetition_rate_by_hand():
    samples = [[1, 2, 3, 1, 2, 3], [4, 5, 6, 7]]
    # bigrams: (1,2)(2,3)(3,1)(1,2)(2,3) + (4,5)(5,6)(6,7) → 6 unique of 8
    assert distinct_n(samples, 2) == pytest.approx(6 / 8)
    # trigrams: 4 + 2 = 6, unique (1,2,3)(2,3,1)(3,1,2)(4,5,6)(5,6,7) = 5
    assert distinct_n(samples, 3) == pytest.approx(5 / 6)
    # 2-grams repeated within a sample: first 2 of 5 repeat → 0.4; second none → 0; mean 0.2
    assert repetition_rate(samples, n=2) == pytest.approx(0.2)
    assert repetition_rate([[7] * 10], n=4) == pytest.approx(1 - 1 / 7)
    assert distinct_n([[1]], 2) == 0.0


def test_scored_perplexity_is_the_continuation_nll(pair):
    scorer, _ = pair
    prompts, conts = [[1, 2, 3], [9, 8]], [[4, 5], [7, 6, 5]]
    got = scored_perplexity(scorer, prompts, conts)
    nll, count = 0.0, 0
    for p, c in zip(prompts, conts, strict=True):
        with torch.no_grad():
            logp = F.log_softmax(scorer(torch.tensor([p + c])).logits[0].double(), -1)
        for j, token in enumerate(c):
            nll -= logp[len(p) + j - 1, token].item()
            count += 1
    assert got == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_generation_is_fixed_length_and_reproducible(pair):
    model, _ = pair
    prompts = [[1, 2, 3], [40, 50]]
    a = generate_continuations(model, prompts, new_tokens=6, seed=7)
    b = generate_continuations(model, prompts, new_tokens=6, seed=7)
    c = generate_continuations(model, prompts, new_tokens=6, seed=8)
    assert a == b and [len(x) for x in a] == [6, 6]
    assert a != c  # the seed drives the sampler
    greedy = generate_continuations(model, prompts[:1], new_tokens=4, do_sample=False)
    with torch.no_grad():
        ids = torch.tensor([prompts[0]])
        for _ in range(4):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], 1)
    assert greedy[0] == ids[0, 3:].tolist()


def test_judge_mean_pooling_and_similarity():
    from eval.judge import Judge

    judge = Judge()
    emb = judge.embed(["A cat sits on the mat.", "hello"])
    assert emb.shape == (2, 384)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    # mean pooling by hand for one text (no padding)
    batch = judge.tokenizer(["hello"], return_tensors="pt")
    with torch.no_grad():
        hidden = judge.model(**batch).last_hidden_state[0].mean(0)
    assert torch.allclose(emb[1], F.normalize(hidden, dim=0), atol=1e-5)
    close, far = judge.similarity(
        ["A cat sits on the mat.", "A cat sits on the mat."],
        ["A kitten is sitting on a rug.", "Stock markets fell sharply on Monday."],
    )
    assert close > far + 0.2
    assert judge.similarity(["same text"], ["same text"])[0] == pytest.approx(1.0, abs=1e-5)


def test_retention_orientation():
    teacher = {
        "perplexity": 20.0,
        "top1_agreement": 1.0,
        "kl_from_teacher": 0.0,
        "coherence_probe": 0.8,
        "repetition_rate": 0.1,
        "distinct_2": 0.9,
    }
    student = teacher | {
        "perplexity": 40.0,
        "top1_agreement": 0.6,
        "kl_from_teacher": 0.5,
        "coherence_probe": 0.4,
        "repetition_rate": 0.55,
    }
    r = retention(teacher, student)
    assert r["perplexity"] == pytest.approx(0.5)
    assert r["top1_agreement"] == pytest.approx(0.6)
    assert r["kl_from_teacher"] == pytest.approx(math.exp(-0.5))
    assert r["coherence_probe"] == pytest.approx(0.5)
    assert r["repetition_rate"] == pytest.approx(0.45 / 0.9)
    assert r["distinct_2"] == pytest.approx(1.0)
    # the teacher against itself retains everything
    full = {m: 0.5 for m in RETENTION} | {"kl_from_teacher": 0.0}
    assert all(v == pytest.approx(1.0) for v in retention(full, full).values())


def test_speed_counts_tokens_and_ratios(pair):
    teacher, student = pair
    ttft, tpot = time_generation(teacher, [1, 2, 3], new_tokens=5)
    assert ttft > 0 and tpot > 0
    speed = measure_speed({"teacher": teacher, "student": student}, [[1, 2, 3], [4, 5]], 4, 1, 2)
    assert speed["student"]["runs"] == 4
    for name in speed:
        s = speed[name]
        assert s["tokens_per_s"] == pytest.approx(1000 / s["tpot_ms"])
        assert s["peak_mem_mb"] >= s["weights_mb"] > 0
    ratios = speed_ratios(speed)
    assert set(ratios) == {"student"}
    assert ratios["student"]["tpot_ms_vs_teacher"] == pytest.approx(
        speed["student"]["tpot_ms"] / speed["teacher"]["tpot_ms"]
    )


def test_ttft_counts_the_prefill_and_tpot_does_not(pair):
    """A prefill slowed by 0.3 s shows in the time to first token and not in the time per
    later token (each decode step embeds one token and is not slowed)."""
    teacher, _ = pair

    def slow_prefill(module, args):
        if args[0].shape[-1] > 1:  # input_ids [1, prompt_len]: the prefill forward
            time.sleep(0.3)

    handle = teacher.model.embed_tokens.register_forward_pre_hook(slow_prefill)
    try:
        ttft, tpot = time_generation(teacher, list(range(1, 9)), new_tokens=4)
    finally:
        handle.remove()
    assert ttft >= 0.3 and tpot < 0.3


def test_heldout_sentences_paragraphs_and_prompts(tokenizer):
    assert split_sentences("It rose in 1901. Floods came! Why? (Nobody knows.) e.g. this") == [
        "It rose in 1901.",
        "Floods came!",
        "Why?",
        "(Nobody knows.) e.g. this",
    ]
    docs = [Document(f"doc{i}", " ".join(PARAGRAPHS[i % 4]) + f" Item {i}.") for i in range(10)]
    docs.append(Document("short", "Only one sentence here."))
    paragraphs = probe_paragraphs(docs, count=5, seed=0)
    assert len(paragraphs) == 5 and all(len(p) >= 3 for p in paragraphs)
    assert probe_paragraphs(docs, count=5, seed=0) == paragraphs  # fixed seed
    prompts = generation_prompts(tokenizer, docs, count=3, prompt_tokens=5, reference_tokens=4)
    assert len(prompts) == 3 and all(len(p.ids) == 5 for p in prompts)
    assert all(p.key != "short" for p in prompts)
    with pytest.raises(ValueError, match="no held-out document"):
        generation_prompts(tokenizer, docs, count=1, prompt_tokens=500, reference_tokens=4)


def test_heldout_documents_are_the_training_test_split():
    from eval.heldout import heldout_documents

    docs = heldout_documents("wiki", 0.05, 0.05)
    assert 300 < len(docs) < 700  # ~5% of 10,033
    assert all(split_of(d.key, 0.05, 0.05) == "test" for d in docs)
