"""``bench/compile_report.py`` compiles the attention kernels for Hopper (sm_90a) without a GPU. One kernel is
compiled here, end to end (planning on meta tensors, ptxas, nvdisasm, the SASS loop analysis), so the report
cannot rot; the verdict logic is checked on records built by hand."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import compile_report  # noqa: E402


def _tools_missing() -> str | None:
    try:
        from triton import knobs
        missing = [name for name in ("ptxas", "nvdisasm") if getattr(knobs.nvidia, name) is None]
    except Exception as err:  # noqa: BLE001 - a triton without the NVIDIA backend
        return f"triton's NVIDIA backend is not importable: {err}"
    return f"triton's bundled {' and '.join(missing)} missing (needed to compile for sm_90a)" if missing else None


def test_compiles_one_forward_config(tmp_path):
    reason = _tools_missing()
    if reason:
        pytest.skip(reason)
    proc = subprocess.run(
        [sys.executable, "bench/compile_report.py", "--quick", "--kernels", "fwd", "--features", "causal",
         "--jobs", "1", "--out", str(tmp_path), "--name", "one"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    report = json.loads((tmp_path / "one.json").read_text())
    (record,) = report["records"]
    assert record["kernel"] == "fwd" and record["features"] == "causal" and record["dtype"] == "bf16"
    assert record["head_dim"] == 128 and record["shipped"]
    assert set(record["config"]) == {"BLOCK_M", "BLOCK_N", "num_warps", "num_stages"}
    assert 32 < record["registers"] <= 255 and record["spills"] >= 0
    assert isinstance(record["ptxas_warnings"], list)
    # bf16 dots on Hopper are warpgroup MMAs: QKᵀ and PV, m = 64 rows per warpgroup.
    assert record["hgmma_shapes"] and all(s.startswith("64x") for s in record["hgmma_shapes"])
    assert 50 < record["loop_instructions"] < record["sass_instructions"]
    assert proc.returncode == (1 if compile_report.failures(report["records"]) else 0)
    assert "## fwd" in (tmp_path / "one.md").read_text()


def _record(**kw):
    base = dict(kernel="fwd", config=dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2), features="causal",
                dtype="bf16", head_dim=128, shipped=True, spills=0, ptxas_warnings=[], hgmma_min_n=64, hmma=0,
                loop_instructions=300, shared_bytes=96 * 1024)
    return {**base, **kw}


def test_failures_are_shipped_16_bit_spills_and_serialisation_warnings():
    c7515 = ("ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized "
             "due to non wgmma instructions defining accumulator registers")
    records = [
        _record(),                                              # clean
        _record(spills=8),                                      # fails
        _record(ptxas_warnings=[c7515]),                        # fails
        _record(ptxas_warnings=[c7515], shipped=False),         # a candidate: reported, never fails the run
        _record(spills=64, dtype="fp32"),                       # the fp32 FMA path is not gated
        _record(shared_bytes=228 * 1024),                       # fails: more than a block may have on sm_90
    ]
    bad = compile_report.failures(records)
    assert len(bad) == 3 and "spills 8 B" in bad[0] and "C7515" in bad[1] and "233472 B" in bad[2]


def test_sass_loop_analysis():
    sass = "\n".join([
        "        /*0000*/                   MOV R1, c[0x0][0x28] ;",
        ".L_x_0:",
        "        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT, gsb0 ;",
        "        /*0020*/                   MUFU.EX2 R2, R3 ;",
        "        /*0030*/              @P0 BRA `(.L_x_0) ;",
        ".L_x_1:",
        "        /*0040*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24, gsb0 ;",
        "        /*0050*/                   FMUL R2, R3, R4 ;",
        "        /*0060*/                   FMUL R2, R3, R4 ;",
        "        /*0070*/              @P1 BRA `(.L_x_1) ;",
        "        /*0080*/                   EXIT ;",
    ])
    a = compile_report.analyse_sass(sass)
    assert a["loops"] == [3, 4] and a["loop_instructions"] == 3 and a["loop_exp2"] == 1
    assert a["hgmma_shapes"] == {"64x128x16": 1, "64x64x16": 1} and a["hgmma_min_n"] == 64
    assert a["sass_instructions"] == 9 and a["hmma"] == 0
    # Tiles under 64 rows get Ampere-style mma.sync instead: counted apart, not as a warpgroup MMA.
    sync = compile_report.analyse_sass(".L_x_0:\n        /*0000*/    HMMA.16816.F32.BF16 R4, R8, R12, R4 ;\n"
                                       "        /*0010*/    @P0 BRA `(.L_x_0) ;")
    assert sync["hmma"] == 1 and sync["hgmma_shapes"] == {} and sync["loops"] == [2]


def test_hot_path_leaves_out_conditional_blocks_only():
    """A predicated forward branch inside a loop jumps over a conditional block (the forward's lazy rescale): the
    hot path leaves the block out, the whole body keeps it; branches that leave the loop or go back do not count."""
    sass = "\n".join([
        ".L_x_0:",
        "        /*0000*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT, gsb0 ;",
        "        /*0010*/                   FSETP.GT.AND P5, PT, R1, R2, PT ;",
        "        /*0020*/              @!P5 BRA `(.L_x_1) ;",
        "        /*0030*/                   FMUL R24, R24, R3 ;",
        "        /*0040*/                   FMUL R25, R25, R3 ;",
        "        /*0050*/                   FMUL R26, R26, R3 ;",
        ".L_x_1:",
        "        /*0060*/                   MUFU.EX2 R2, R3 ;",
        "        /*0070*/              @P2 BRA `(.L_x_2) ;",
        "        /*0080*/              @P1 BRA `(.L_x_0) ;",
        ".L_x_2:",
        "        /*0090*/                   EXIT ;",
    ])
    a = compile_report.analyse_sass(sass)
    assert a["loops"] == [9] and a["loop_instructions"] == 9
    assert a["loops_hot"] == [6] and a["loop_hot_instructions"] == 6
