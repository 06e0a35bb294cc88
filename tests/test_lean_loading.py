"""Loading at the target dtype: the parameters come out in it, and loading holds no second full copy of the weights.

The model is saved in float32 and loaded in bfloat16 in a fresh process; its resident high-water
mark over the load (``VmHWM`` after ``/proc/self/clear_refs``, as the stage table reads it) must stay
within 1.4 times the loaded weights (measured 1.23 here, where one layer's float32 experts are a
tenth of the model; 1.14 at OLMoE's shape). transformers' default (memory-mapped file, tensors
read ahead on four threads) took 3.8 times here and 1.9 times at OLMoE's shape.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, re, sys
from pathlib import Path
import torch
from core.model_access.loading import load_hf

def status(key):
    return int(re.search(key + r":\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024

from transformers import AutoModelForCausalLM, AutoTokenizer  # imports done before the peak is reset
import transformers.models.olmoe.modeling_olmoe
Path("/proc/self/clear_refs").write_text("5")
before = status("VmRSS")
model, _ = load_hf(sys.argv[1], None, torch.bfloat16, "cpu", False)
print(json.dumps({"grown": status("VmHWM") - before,
                  "weights": sum(p.numel() * p.element_size() for p in model.parameters()),
                  "dtypes": sorted({str(p.dtype) for p in model.parameters()})}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the resident peak is read from Linux's /proc")
def test_loading_at_bf16_keeps_no_full_size_copy(tmp_path):
    import transformers

    cfg = transformers.OlmoeConfig(vocab_size=8192, hidden_size=384, intermediate_size=384, num_hidden_layers=16,
                                   num_attention_heads=4, num_key_value_heads=4, num_experts=16, num_experts_per_tok=2,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    from core.model_access.random_weights import save_random_model

    torch.manual_seed(0)
    save_random_model(cfg, tmp_path / "model", torch.float32)  # a float32 checkpoint, written a layer at a time
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "model")], cwd=REPO, capture_output=True, text=True,
                         check=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["dtypes"] == ["torch.bfloat16"]
    assert res["weights"] > 200 * 2**20  # big enough that the interpreter's own growth is noise
    print(f"\nloading grew {res['grown'] / res['weights']:.2f}x the weights")
    assert res["grown"] <= 1.4 * res["weights"], (res["grown"] / res["weights"], res)
