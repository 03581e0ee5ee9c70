"""The evaluation suite: a student (and its int8 variant, when present) against its teacher on
held-out text — perplexity, agreement, coherence probe, generation quality — plus VQA for
vision-language models and decode speed, gathered into one report.

Read top to bottom: held-out data → per-model metrics → retention → speed → report files.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn
from tqdm.auto import tqdm

from eval.agreement import teacher_agreement
from eval.generation import generate_continuations, scored_nll
from eval.heldout import generation_prompts, heldout_blocks, heldout_documents, probe_paragraphs
from eval.intervals import STATISTICS, metric_interval, retention_interval
from eval.judge import Judge
from eval.probe import coherence_probe, probe_pairs
from eval.retention import RETENTION, retention
from eval.speed import measure_engine_speed, measure_speed, speed_ratios

log = logging.getLogger(__name__)

TEACHER, STUDENT = "teacher", "student"


@dataclass
class EvalSettings:
    """Every knob of the suite (configs/eval/*.yaml); sizes bound its cost."""

    seed: int = 0
    # held-out data: the same corpus and hash split training used
    source: str = "wiki"
    validation_fraction: float = 0.05
    test_fraction: float = 0.05
    hf: dict | None = None
    # perplexity + teacher agreement on packed test blocks
    seq_len: int = 256
    blocks: int = 8
    batch_size: int = 2
    # coherence probe
    probe_paragraphs: int = 16
    probe_min_sentences: int = 3
    probe_max_chars: int = 700
    # generation quality
    prompts: int = 4
    prompt_tokens: int = 32
    new_tokens: int = 32
    temperature: float = 0.8
    top_p: float = 0.95
    repetition_n: int = 4
    # speed
    speed_prompts: int = 2
    speed_new_tokens: int = 16
    speed_warmup: int = 1
    speed_repeats: int = 3
    speed_rounds: int = 3  # rounds of repeats until two agree within 5% (else flagged noisy)
    # int8 student: time serve.int8's fbgemm kernels, not transformers' decompressed fp32
    int8_kernels: bool = True
    # VQA (vision-language models only)
    vqa_questions: int = 40
    vqa_examples: int = 6
    # lm-evaluation-harness tasks (empty: skipped)
    harness_tasks: list[str] = field(default_factory=list)
    harness_include_path: str | None = None
    harness_limit: int | None = None
    # report
    samples_in_report: int = 4

    def __post_init__(self) -> None:
        for name in ("blocks", "probe_paragraphs", "prompts", "prompt_tokens", "new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.speed_repeats < 1 or self.speed_prompts < 1:
            raise ValueError("eval.speed_repeats and eval.speed_prompts must be ≥ 1")
        if self.probe_min_sentences < 2:
            raise ValueError("eval.probe_min_sentences must be ≥ 2 to have an order to shuffle")
        self.harness_tasks = list(self.harness_tasks)


def text_metrics(
    settings: EvalSettings, teacher: nn.Module, students: dict[str, nn.Module], tokenizer, docs
) -> tuple[dict[str, dict], list[dict], dict[str, dict[str, list]]]:
    """Per-model coherence metrics, side-by-side sample generations, and every metric's item
    records (per block / paragraph / prompt) from which the metric and its interval follow."""
    models = {TEACHER: teacher, **students}
    metrics: dict[str, dict] = {name: {} for name in models}
    items: dict[str, dict[str, list]] = {name: {} for name in models}

    blocks = heldout_blocks(tokenizer, docs, settings.seq_len, settings.blocks)
    for name, student in students.items():
        agreement = teacher_agreement(
            teacher, student, blocks, settings.batch_size, progress=True, desc=f"eval: {name} ppl"
        )
        per_block = agreement["per_block"]
        items[TEACHER] |= {
            "perplexity": [(b["nll_t"], b["positions"]) for b in per_block],
            "top1_agreement": [(b["positions"], b["positions"]) for b in per_block],
            "kl_from_teacher": [(0.0, b["positions"]) for b in per_block],
        }
        items[name] |= {
            "perplexity": [(b["nll_s"], b["positions"]) for b in per_block],
            "top1_agreement": [(b["agree"], b["positions"]) for b in per_block],
            "kl_from_teacher": [(b["kl"], b["positions"]) for b in per_block],
        }
        metrics[name]["tokens"] = agreement["tokens"]
    metrics[TEACHER]["tokens"] = len(blocks) * (settings.seq_len - 1)

    paragraphs = probe_paragraphs(
        docs,
        settings.probe_paragraphs,
        settings.probe_min_sentences,
        settings.probe_max_chars,
        settings.seed,
    )
    pairs = probe_pairs(tokenizer, paragraphs, settings.seed)
    for name, model in tqdm(models.items(), desc="eval: coherence probe"):
        probe = coherence_probe(model, pairs, settings.batch_size * 4)
        metrics[name]["coherence_margin"] = probe["coherence_margin"]
        items[name]["coherence_probe"] = [float(m > 0) for m in probe["margins"]]

    prompts = generation_prompts(
        tokenizer,
        docs,
        settings.prompts,
        settings.prompt_tokens,
        settings.new_tokens,
        settings.seed,
    )
    prompt_ids = [p.ids for p in prompts]
    continuations = {
        name: generate_continuations(
            model,
            prompt_ids,
            settings.new_tokens,
            settings.seed,
            temperature=settings.temperature,
            top_p=settings.top_p,
            pad_token_id=tokenizer.pad_token_id or 0,
        )
        for name, model in tqdm(models.items(), desc="eval: generation")
    }
    texts = {name: [tokenizer.decode(c) for c in conts] for name, conts in continuations.items()}
    judge = Judge()
    references = [p.reference for p in prompts]
    for name in models:
        conts = continuations[name]
        items[name] |= {
            "generation_teacher_ppl": scored_nll(teacher, prompt_ids, conts),
            "distinct_2": conts,
            "distinct_3": conts,
            "repetition_rate": conts,
            "similarity_to_teacher": judge.similarity(texts[name], texts[TEACHER]),
            "similarity_to_reference": judge.similarity(texts[name], references),
        }
    for name in models:  # every metric is the statistic of its items (eval/intervals.py)
        for metric, records in items[name].items():
            metrics[name][metric] = STATISTICS[metric][0](records)
    log.info(
        "eval: %d blocks, %d probe paragraphs, %d prompts", len(blocks), len(pairs), len(prompts)
    )
    samples = [
        {"prompt": p.text, "reference": p.reference, **{n: texts[n][i] for n in models}}
        for i, p in enumerate(prompts[: settings.samples_in_report])
    ]
    return metrics, samples, items


def expected_seconds(settings: EvalSettings, students: int = 1) -> float:
    """A rough wall-time estimate for a ~135M teacher on a 2-core CPU, scaled so that
    eval=full with one student comes to the 12 minutes it took here (per 256-token block
    through teacher + student ≈ 2.6 s, probe paragraph ≈ 0.5 s per model, sampled token
    ≈ 0.17 s per model, timed token ≈ 0.1 s per model and round)."""
    models = students + 1
    blocks = settings.blocks * settings.seq_len / 256 * 2.6 * students
    probe = settings.probe_paragraphs * 0.5 * models
    generation = settings.prompts * settings.new_tokens * 0.17 * models * 1.3  # + scoring
    runs = settings.speed_prompts * (settings.speed_repeats * 2 + settings.speed_warmup)
    speed = runs * settings.speed_new_tokens * 0.1 * models
    return 30 + blocks + probe + generation + speed


def parameter_count(model: nn.Module) -> int:
    """Parameters of the model as trained: int8 students count their int8 weights too (their
    fbgemm modules hold packed weights, not Parameters; load_int8 records the count first)."""
    recorded = getattr(model, "nd_parameters", None)
    if recorded is not None:
        return int(recorded)
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def intervals_for(items: dict[str, dict[str, list]]) -> tuple[dict, dict]:
    """(per model: metric → {value, n, unit, low, high}; per student: the retention's)."""
    intervals = {
        name: {metric: metric_interval(metric, records) for metric, records in per.items()}
        for name, per in items.items()
    }
    retention_intervals = {
        name: {
            metric: retention_interval(
                metric, items[TEACHER][metric], records, RETENTION[metric][0]
            )
            for metric, records in per.items()
            if metric in items[TEACHER] and metric in RETENTION
        }
        for name, per in items.items()
        if name != TEACHER
    }
    return intervals, retention_intervals


def vqa_metrics(
    settings: EvalSettings, models: dict[str, nn.Module], processor
) -> tuple[dict[str, dict], list[dict], dict[str, dict[str, list]]]:
    """easy-VQA exact-match accuracy per model, a few examples with every model's answer, and
    the per-question hits (the interval's items)."""
    from eval.vqa import answer_questions, easy_vqa_items, exact_match_accuracy, normalize_answer

    items = easy_vqa_items(settings.vqa_questions, settings.seed)
    gold = [item.answer for item in items]
    answers = {name: answer_questions(model, processor, items) for name, model in models.items()}
    metrics = {name: {"vqa_accuracy": exact_match_accuracy(a, gold)} for name, a in answers.items()}
    examples = [
        {"image": str(item.image), "question": item.question, "answer": item.answer}
        | {name: answers[name][i] for name in models}
        for i, item in enumerate(items[: settings.vqa_examples])
    ]
    hits = {
        name: {
            "vqa_accuracy": [
                float(normalize_answer(p) == normalize_answer(g))
                for p, g in zip(a, gold, strict=True)
            ]
        }
        for name, a in answers.items()
    }
    return metrics, examples, hits


def evaluate(
    settings: EvalSettings,
    teacher: nn.Module,
    students: dict[str, nn.Module],
    tokenizer,
    output_dir: str | Path,
    processor=None,
    docs=None,
    metrics_csv: str | Path | None = None,
    config: dict | None = None,
    wandb_run=None,
    model_dirs: dict[str, str] | None = None,
) -> dict:
    """Run the suite and write output_dir/report.{json,md,html}; returns the report dict.

    `students` maps names to models ("student" is the fp32 student; e.g. "student_int8" the
    quantized one). `docs` are the held-out documents (default: the configured test split).
    `model_dirs` (name → checkpoint dir, every model) times speed on the serving runtime
    (serve/, int8 kernels) instead of transformers' generate().
    """
    from eval.report import write_report
    from eval.vqa import is_vlm

    if STUDENT not in students:
        raise ValueError(f"evaluate() needs a model named '{STUDENT}', got {sorted(students)}")
    if is_vlm(teacher) and processor is None:
        raise ValueError("the models are vision-language models; evaluate() needs a processor")
    start = time.perf_counter()
    models = {TEACHER: teacher, **students}
    if docs is None:
        docs = heldout_documents(
            settings.source, settings.validation_fraction, settings.test_fraction, settings.hf
        )
    report: dict = {
        "models": {},
        "retention": {},
        "retention_by_model": {},
        "speed": {},
        "config": {"eval": asdict(settings), **(config or {})},
        "samples": [],
        "vqa_examples": [],
        "seconds": {},
    }

    t = time.perf_counter()
    metrics, report["samples"], items = text_metrics(settings, teacher, students, tokenizer, docs)
    report["seconds"]["text"] = time.perf_counter() - t

    if is_vlm(teacher):
        t = time.perf_counter()
        vqa, report["vqa_examples"], vqa_items = vqa_metrics(settings, models, processor)
        for name in models:
            metrics[name] |= vqa[name]
            items[name] |= vqa_items[name]
        report["seconds"]["vqa"] = time.perf_counter() - t
    report["models"] = metrics
    report["retention_by_model"] = {
        name: retention(metrics[TEACHER], metrics[name]) for name in students
    }
    report["retention"] = report["retention_by_model"][STUDENT]
    report["intervals"], report["retention_intervals"] = intervals_for(items)
    for name, model in models.items():
        metrics[name]["parameters"] = parameter_count(model)

    t = time.perf_counter()
    prompts = generation_prompts(
        tokenizer, docs, settings.speed_prompts, settings.prompt_tokens, 1, settings.seed
    )
    timing = (settings.speed_new_tokens, settings.speed_warmup, settings.speed_repeats)
    ids = [p.ids for p in prompts]
    if model_dirs and set(model_dirs) >= set(models) and not is_vlm(teacher):
        speed = measure_engine_speed(model_dirs, ids, *timing, max_rounds=settings.speed_rounds)
    else:
        speed = measure_speed(models, ids, *timing, max_rounds=settings.speed_rounds)
    for name, ratios in speed_ratios(speed).items():
        speed[name] |= ratios
    report["speed"] = speed
    report["speed_noisy"] = any(s.get("noisy") for s in speed.values())
    report["seconds"]["speed"] = time.perf_counter() - t

    if settings.harness_tasks:
        from eval.harness import run_harness

        t = time.perf_counter()
        report["harness"] = {
            name: run_harness(
                model,
                tokenizer,
                settings.harness_tasks,
                include_path=settings.harness_include_path,
                limit=settings.harness_limit,
            )
            for name, model in models.items()
        }
        report["seconds"]["harness"] = time.perf_counter() - t

    report["seconds"]["total"] = time.perf_counter() - start
    write_report(report, Path(output_dir), metrics_csv=metrics_csv, wandb_run=wandb_run)
    return report
