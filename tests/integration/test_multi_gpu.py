"""Models spread over several GPUs, or over a GPU and CPU memory, by accelerate; dataset jobs whose processes each
spread their model over their own GPUs. These need CUDA devices and skip without them (``bench/gpu_suite.sh multi``
runs them on a machine with several GPUs); the same code paths on the CPU are tested in ``test_offload.py`` and
``tests/jobs/test_jobs_shards.py``.

The reference is the same weights on one GPU: scores equal within 1e-5 (float32), the model's hooks and forwards
the same objects afterwards.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import gim_fast
from gim_fast.models import load_pretrained
from jobs_support import ROOT, save_tiny, table_rows, write_jsonl
from tiny_models import random_ids

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
TOLERANCE = 1e-5


def _needs(n: int):
    return pytest.mark.skipif(GPUS < n, reason=f"needs {n} CUDA device{'s' * (n != 1)}, this machine has {GPUS}")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("multi") / "llama", "llama", seed=3)


def _close(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert float((a - b).abs().max()) <= TOLERANCE * max(1.0, float(b.abs().max()))


def _hooks(model):
    return {n: (m.__dict__.get("forward"), m.__dict__.get("_old_forward"), getattr(m, "_hf_hook", None))
            for n, m in model.named_modules()}


def _same_objects(before, after):
    assert before.keys() == after.keys()
    for name, objects in before.items():
        assert all(a is b for a, b in zip(objects, after[name])), name


def _reference(folder):
    model, tok = load_pretrained(folder)
    return model.to("cuda:0"), tok


@_needs(2)
def test_explain_across_two_gpus(folder):
    reference, _ = _reference(folder)
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 1,
                  "model.norm": 1, "lm_head": 1}
    model, _ = load_pretrained(folder, device_map=device_map)
    assert {p.device for p in model.parameters()} == {torch.device("cuda", 0), torch.device("cuda", 1)}
    before = _hooks(model)
    ids = torch.stack([random_ids(11, seed=1), random_ids(11, seed=2)])
    for checkpointing in (False, True):
        got = gim_fast.explain(model, ids, baseline_token_id=0, checkpointing=checkpointing)
        _close(got, gim_fast.explain(reference, ids.cuda(), baseline_token_id=0))
    answer = gim_fast.explain_answer(model, ids[0], random_ids(3, seed=5), baseline_token_id=0)
    _close(answer.scores, gim_fast.explain_answer(reference, ids[0], random_ids(3, seed=5), baseline_token_id=0).scores)
    _same_objects(before, _hooks(model))
    from gim_fast.memory import model_estimates

    assert set(model_estimates(model, 11, 2, backend="triton", checkpointing=False)) == {
        torch.device("cuda", 0), torch.device("cuda", 1)}


@_needs(1)
def test_layers_in_cpu_memory_with_the_rest_on_a_gpu(folder, tmp_path):
    """"cpu" in a device map beside a GPU: the layer's weights stay in CPU memory and are copied to the GPU when it
    runs; the memory plan counts that copy on the GPU."""
    reference, _ = _reference(folder)
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": 0, "lm_head": 0}
    model, _ = load_pretrained(folder, device_map=device_map, offload_folder=tmp_path / "off")
    assert any(p.device.type == "meta" for p in model.model.layers[0].parameters())
    before = _hooks(model)
    ids = random_ids(13, seed=3)
    for checkpointing in (False, True):
        _close(gim_fast.explain(model, ids, baseline_token_id=0, checkpointing=checkpointing),
               gim_fast.explain(reference, ids.cuda(), baseline_token_id=0))
    _same_objects(before, _hooks(model))
    assert all(p.device.type == "meta" for p in model.model.layers[0].parameters())
    from gim_fast.memory import offload_of

    assert torch.device("cuda", 0) in offload_of(model)


@_needs(2)
def test_torchrun_processes_each_on_their_own_gpus(folder, tmp_path):
    """``torchrun --nproc-per-node 2 gim-fast attribute --device-map auto``: each process spreads its model over
    its own share of the GPUs; the rows equal one process's."""
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": f"row {i} " * (1 + i % 5)} for i in range(24)])
    args = ["attribute", "--data", str(data), "--model", str(folder), "--batch-tokens", "64", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "gim_fast", *args, "--out", str(tmp_path / "dist"), "--device-map", "auto"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "gim_fast", *args, "--out", str(tmp_path / "single"),
                             "--device", "cuda:0"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    manifest = json.loads((tmp_path / "dist" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and set(manifest["counts"]["rows_per_rank"]) == {"0", "1"}
    for a, b in zip(table_rows(tmp_path / "dist"), table_rows(tmp_path / "single")):
        assert a["token_ids"] == b["token_ids"] and a["target_id"] == b["target_id"]
        assert max(abs(x - y) for x, y in zip(a["scores"], b["scores"])) <= TOLERANCE
