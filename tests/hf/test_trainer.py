"""transformers' Trainer trains an xmoe model loaded through AutoModelForCausalLM: the loss it
optimises is the model's (cross-entropy + 0.01 x balancing loss), and the weights move."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

pytest.importorskip("accelerate")  # the Trainer needs it

from helpers.hf import VOCAB, hf_from_gpt, tiny_gpt  # noqa: E402


def test_trainer_trains_a_loaded_model(tmp_path):
    hf_from_gpt(tiny_gpt()).save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(VOCAB, (16, 24))]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=4,
                             learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    result = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and losses[-1] < losses[0] and result.training_loss == pytest.approx(sum(losses) / 6, rel=1e-3)
    moved = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    router_params = {n for n in before if ".router." in n}
    assert router_params and router_params <= moved and "transformer.wte.weight" in moved
    model.eval()
    batch = torch.stack([r["input_ids"] for r in rows[:4]])
    with torch.no_grad():  # the loss the Trainer optimises: shifted cross-entropy + 0.01 * balancing loss
        trainer_loss = trainer.compute_loss(model, {"input_ids": batch, "labels": batch})
        out = model(batch)
    ce = F.cross_entropy(out.logits[:, :-1].double().reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
    torch.testing.assert_close(trainer_loss.double(), ce + 0.01 * out.aux_loss.double(), rtol=1e-5, atol=1e-6)
