"""``bench/compile_report.py`` compiles the attention kernels for any GPU architecture without a GPU. One kernel is
compiled here, end to end (planning on meta tensors, ptxas, nvdisasm, the SASS loop analysis), for Hopper, and
the forward at T = 2 for sm_100a (tcgen05, tensor memory: the construct that aborted Triton's compiler there) and
gfx942 (AMDGCN analysis), so the report cannot rot; the verdict logic and the worker pool's handling of a
compiler that kills its process are checked on records and workers built by hand."""
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


def _dying_worker(conn, arch, cache_dir, err_path):
    """A compiler process whose compiler aborts on the task named "abort" (as an MLIR assertion does)."""
    import os as _os
    while True:
        task = conn.recv()
        if task is None:
            return
        if task["feature"] == "abort":
            with open(err_path, "w") as f:
                f.write("<unknown>:0: error: parent layout must have at least rank >= 2\n"
                        "python: StorageUniquerSupport.h:180: Assertion `succeeded(...)' failed.\n")
            _os.abort()
        conn.send(dict(compile_report._base_record(task), compiled=True, error=None))


def test_a_compiler_that_kills_its_process_is_a_recorded_failure():
    """Every compile runs in a worker process: an abort takes only the worker, the task is recorded as not
    compiling with the compiler's last words, a new worker takes the remaining tasks."""
    base = dict(arch="sm_100a", dtype="bf16", head_dim=128, kind="fwd", index=0, override=None,
                config=dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2))
    tasks = [dict(base, feature=f) for f in ("causal", "abort", "softcap", "causal-T2")]
    tasks[1]["feature"] = "abort"
    records = compile_report.run_tasks(tasks, "sm_100a", 1, "/tmp", worker=_dying_worker)
    assert [r["compiled"] for r in records] == [True, False, True, True]
    assert "died" in records[1]["error"] and "parent layout must have at least rank >= 2" in records[1]["error"]
    records[1]["features"] = "causal"     # a shipped 16-bit config that does not compile fails the report
    bad = compile_report.failures(records[1:2], "sm_100a")
    assert len(bad) == 1 and "does not compile" in bad[0]


def test_dot_families_from_the_ttgir():
    """Each dot of the final TTGIR is classified by what it became: mma.sync (NVIDIA MMA v2), wgmma, tcgen05,
    MFMA, or plain FMA (a blocked result layout: no tensor core)."""
    ttgir = "\n".join([
        "#blocked = #ttg.blocked<{sizePerThread = [1, 1], threadsPerWarp = [1, 32], warpsPerCTA = [4, 1], order = [1, 0]}>",
        "#mma = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [4, 1], instrShape = [16, 8]}>",
        "#mma1 = #ttg.amd_mfma<{version = 3, warpsPerCTA = [4, 1], instrShape = [32, 32], isTransposed = true}>",
        "    %0 = tt.dot %a, %b, %c, inputPrecision = tf32 : tensor<64x128xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma, kWidth = 2}>> * tensor<128x32xbf16, #ttg.dot_op<{opIdx = 1, parent = #mma, kWidth = 2}>> -> tensor<64x32xf32, #mma> loc(#loc1)",
        "    %1 = tt.dot %a, %b, %c : tensor<16x16xf32, #ttg.dot_op<{opIdx = 0, parent = #blocked}>> * tensor<16x32xf32, #ttg.dot_op<{opIdx = 1, parent = #blocked}>> -> tensor<16x32xf32, #blocked> loc(#loc2)",
        "    %2 = tt.dot %a, %b, %c : tensor<128x64xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma1, kWidth = 8}>> * tensor<64x128xbf16, #ttg.dot_op<{opIdx = 1, parent = #mma1, kWidth = 8}>> -> tensor<128x128xf32, #mma1> loc(#loc3)",
        "    ttng.tc_gen5_mma %a, %b, %d, %false, %t : !ttg.memdesc<128x128xbf16, #shared, #smem>, !ttg.memdesc<128x64xbf16, #shared2, #smem, mutable>, !ttg.memdesc<128x64xf32, #tmem1, #ttng.tensor_memory, mutable> loc(#loc4)",
        "    %3 = ttng.warp_group_dot %a, %b, %c : !ttg.memdesc<64x128xbf16, #shared, #smem> * !ttg.memdesc<128x64xbf16, #shared1, #smem> -> tensor<64x64xf32, #mma2> loc(#loc5)",
    ])
    a = compile_report.analyse_dots(ttgir)
    assert a["dots"] == {"fma": 1, "mfma": 1, "mma.sync": 1, "tcgen05.mma": 1, "wgmma": 1}
    assert a["dot_shapes"] == {"fma 16x32x16": 1, "mfma 128x128x64": 1, "mma.sync 64x32x128": 1,
                               "tcgen05.mma 128x64x128": 1, "wgmma 64x64x128": 1}
    records = [_record(dots={"mma.sync": 2}), _record(dots={"wgmma": 2}), _record(dots={"wgmma": 1}, head_dim=256,
                                                                                 hmma=4)]
    assert compile_report.wrong_instruction(records[0], "sm_90a") == ["mma.sync"]
    assert compile_report.wrong_instruction(records[1], "sm_90a") == []
    assert compile_report.wrong_instruction(records[2], "sm_100a") == []      # D = 256: not checked
    assert compile_report.wrong_instruction(records[1], "sm_100a") == ["wgmma"]


def test_amd_facts_from_the_amdgcn_listing():
    asm = "\n".join([
        "\t.text",
        "_attn_fwd_kernel:                       ; @_attn_fwd_kernel",
        "\ts_load_dwordx2 s[2:3], s[0:1], 0x0",
        ".LBB0_1:                                ; =>This Inner Loop Header: Depth=1",
        "\tv_mfma_f32_32x32x8_bf16 v[0:15], v[16:17], v[18:19], v[0:15]",
        "\tv_exp_f32_e32 v1, v2",
        "\ts_cbranch_scc1 .LBB0_1",
        "\ts_endpgm",
        ".Lfunc_end0:",
        "; NumVgprs: 250", "; NumAgprs: 16", "; TotalNumVgprs: 268", "; TotalNumSgprs: 40", "; ScratchSize: 24",
        "; Occupancy: 1",
        "    .group_segment_fixed_size: 32768", "    .sgpr_spill_count: 0", "    .vgpr_spill_count: 6",
    ])
    a = compile_report.analyse_amd(asm)
    assert (a["vgprs"], a["agprs"], a["registers"], a["sgprs"]) == (250, 16, 268, 40)
    assert (a["spills"], a["scratch_bytes"], a["occupancy"], a["lds_bytes"]) == (6, 24, 1, 32768)
    assert a["mma_instructions"] == {"v_mfma_f32_32x32x8_bf16": 1}
    assert a["loops"] == [3] and a["loop_exp2"] == 1
    record = _record(spills=a["spills"], scratch_bytes=24, vgpr_spills=6, shared_bytes=32768, dots={"mfma": 2})
    (bad,) = compile_report.failures([record], "gfx942")
    assert "spills 6 registers" in bad and "scratch 24 B" in bad


@pytest.mark.parametrize("arch,family", [("sm_100a", "tcgen05.mma"), ("gfx942", "mfma")])
def test_compiles_the_forward_for_blackwell_and_mi300(tmp_path, arch, family):
    """The T = 2 forward (its unmasked stage holds the block-wide lazy-rescale decision) compiles for sm_100a,
    where it used to stop Triton's compiler, and for gfx942; its dots are the architecture's own MMA."""
    if arch.startswith("sm") and _tools_missing():
        pytest.skip(_tools_missing())
    proc = subprocess.run(
        [sys.executable, "bench/compile_report.py", "--arch", arch, "--quick", "--kernels", "fwd", "--features",
         "causal-T2", "--jobs", "1", "--out", str(tmp_path), "--name", "one"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    (record,) = json.loads((tmp_path / "one.json").read_text())["records"]
    assert record["compiled"], record["error"]
    assert record["arch"] == arch and record["dots"] == {family: record["dots"][family]} and record["registers"] > 32
    assert record["loops"], "no inner loop with tensor-core work found"
