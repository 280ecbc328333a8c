"""One training step of PSMLightning on CPU, for tests/test_ddp.py: ``--world 1`` (one process, the
whole batch) or ``--world N`` (Lightning ``strategy="ddp"``, gloo, N processes, rank r gets the r-th
contiguous slice). Writes ``rank{r}.pt`` = the step's loss, the synced gradients and the metadata
validity masks after dropout."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def items(n: int):
    from psm_mapping.train.data import Item

    g = torch.Generator().manual_seed(5)
    out = []
    for i in range(n):
        out.append(Item(f"yfcc-{i}", torch.randn(3, 224, 224, generator=g), [1, 3, 5][i % 3],
                        torch.randn(4, 64, 64, generator=g), 1, f"the sound of birds number {i}",
                        float(-50 + 7 * i), float(-170 + 23 * i), 1 + i % 12, i % 24, i % 4, i % 3))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--batch", type=int, default=6, help="global batch")
    ap.add_argument("--droprate", type=float, default=0.0)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    import lightning as L
    from transformers import AutoTokenizer

    from psm_mapping.train.data import Collate
    from psm_mapping.train.module import PSMLightning
    from test_train import MICRO_CLAP

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    rank = int(os.environ.get("LOCAL_RANK", 0))  # the launcher sets it in the processes it starts
    torch.manual_seed(0)
    # dropout layers draw random masks per sample: no split of a batch can reproduce them, so off
    clap = {**MICRO_CLAP, "audio_config": {**MICRO_CLAP["audio_config"], "drop_path_rate": 0.0,
                                           "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
            "text_config": {**MICRO_CLAP["text_config"], "hidden_dropout_prob": 0.0,
                            "attention_probs_dropout_prob": 0.0}}
    module = PSMLightning(embed_dim=32, depth=1, num_heads=1, fc_dim=16, clap_config=clap,
                          meta_droprate=a.droprate, learning_rate=0.0)
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(m, torch.nn.MultiheadAttention):
            m.dropout = 0.0
    per = a.batch // a.world
    data = items(a.batch)[rank * per:(rank + 1) * per]
    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    loader = torch.utils.data.DataLoader(data, batch_size=per, shuffle=False, collate_fn=Collate(module.hparams.metadata_type, tok))
    out = Path(a.out)
    rec: dict = {}
    drops: list = []
    from psm_mapping.train import module as mod

    orig = mod.apply_metadata_dropout

    def spy(meta, rate, gen=None):
        res = orig(meta, rate, gen)
        drops.append({k: v[1].clone() for k, v in res.items()})
        return res

    mod.apply_metadata_dropout = spy

    class Grab(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            # BatchNorm (CLAP audio) normalises with its batch's statistics, a local batch's under DDP
            # on CPU (SyncBatchNorm is GPU-only): use the running statistics, identical everywhere
            for m in pl_module.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()

        def on_after_backward(self, trainer, pl_module):
            rec["grads"] = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            rec["loss"] = float(outputs["loss"].detach())

    trainer = L.Trainer(accelerator="cpu", devices=a.world, strategy="ddp" if a.world > 1 else "auto", max_steps=1,
                        limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        callbacks=[Grab()])
    trainer.fit(module, train_dataloaders=loader)
    rec["drops"] = drops
    rec["world"] = trainer.world_size
    torch.save(rec, out / f"rank{trainer.global_rank}.pt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
