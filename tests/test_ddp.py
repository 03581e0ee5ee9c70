"""`trainer=ddp` with two CPU processes (gloo): both ranks end with the same student weights.

The test launches this file under torch.distributed.run; `worker` is what each rank runs.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

VOCAB = 128


def worker(out_dir: Path) -> None:
    import lightning as L
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from transformers import LlamaForCausalLM

    from distill.data.text import TextDataModule
    from distill.losses import KDLoss
    from distill.models.tiny import tiny_llama_config
    from distill.module import DistillModule
    from distill.paths import configs_dir, recipes_dir
    from distill.rundir import register_resolvers

    torch.set_num_threads(1)
    register_resolvers()
    with initialize_config_dir(config_dir=str(recipes_dir()), version_base="1.3"):
        cfg = compose(
            "nano-text",
            overrides=[
                f"hydra.searchpath=[file://{configs_dir()}]",
                "trainer=ddp",
                "trainer.accelerator=cpu",
                "trainer.devices=2",
                "trainer.precision=32-true",
                "trainer.max_steps=3",
                "trainer.limit_val_batches=0",
                "trainer.enable_progress_bar=false",
            ],
        )
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB, num_hidden_layers=2))
    torch.manual_seed(1)
    student = LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB, num_hidden_layers=1))
    init = {k: v.clone() for k, v in student.state_dict().items()}
    data = TextDataModule(tokenizer=None, seq_len=8, batch_size=2)
    generator = torch.Generator().manual_seed(0)
    data.blocks = {
        s: torch.randint(0, VOCAB, (12, 8), generator=generator)
        for s in ("train", "validation", "test")
    }
    data.blocks["train"][:, 0] = torch.arange(12)  # block id in the first token
    seen: list[int] = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.extend(batch[0][:, 0].tolist())

    trainer = instantiate(
        cfg.trainer, logger=False, enable_checkpointing=False, callbacks=[Record()]
    )
    trainer.fit(DistillModule(student, teacher, KDLoss(), lr=1e-2), datamodule=data)
    torch.save(
        {"init": init, "state": student.state_dict(), "seen": seen, "world": trainer.world_size},
        out_dir / f"rank{trainer.global_rank}.pt",
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_cpu_ranks_agree_on_weights(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        __file__,
        str(tmp_path),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert len(ranks[0]["seen"]) == len(ranks[1]["seen"]) == 6  # 3 steps × batch 2 per rank
    assert not set(ranks[0]["seen"]) & set(ranks[1]["seen"])  # disjoint shards
    for name, weight in ranks[0]["state"].items():
        torch.testing.assert_close(ranks[1]["state"][name], weight, msg=name)
    assert any(not torch.equal(ranks[0]["init"][k], v) for k, v in ranks[0]["state"].items())


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
