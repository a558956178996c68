"""bench.py's report. The measurements themselves need a GPU (bash bench.sh on one)."""
import json

from bench import write_outputs


def test_table_has_ratios_against_the_seed_and_diffusers(tmp_path):
    row = lambda name, img_s, tflops: dict(name=name, batch_size=230, img_per_s=img_s, step_ms=1.0, gflop_per_image=92.2,
                                           tflops=tflops, peak_memory_gib=6.8)
    results = dict(card="test card", torch="x", date="2026-11-26", bf16_matmul_peak_tflops=800.0,
                   rows=[row("(1) seed", 1000.0, 100.0), row("(2) diffusers", 2000.0, 80.0), row("(3) ours", 4000.0, 400.0)],
                   sampling=[dict(name="sampling dpm-20", num_images=5000, seconds=10.0, samples_per_s=500.0)])
    table = write_outputs(results, str(tmp_path))
    lines = table.splitlines()
    assert lines[0].startswith("Card: test card") and "peak 800 TFLOP/s" in lines[0]
    ours = next(line for line in lines if line.startswith("| (3) ours"))
    assert "| 4,000 |" in ours and "| 50% |" in ours and "| 4.00x | 2.00x |" in ours
    assert "50,000 samples in 100 s" in table
    assert json.loads((tmp_path / "bench.json").read_text())["rows"][2]["img_per_s"] == 4000.0
    assert (tmp_path / "bench.md").read_text() == table + "\n"


def test_profile_kinds_put_fused_triton_kernels_apart_from_convolutions():
    from bench import kernel_kind
    assert kernel_kind("triton_poi_fused__to_copy_add_cat_convolution_native_dropout_silu_71").startswith("fused")
    assert kernel_kind("sm90_xmma_wgrad_indexed_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc").startswith("convolution")
    assert kernel_kind("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16") == "attention"
    assert kernel_kind("void at::native::elementwise_kernel<128, 4, direct_copy_kernel_cuda>").startswith("copies")


def test_loop_windows_splits_the_windows_by_what_happened_in_them(tmp_path):
    from bench import loop_windows
    records = [{"kind": "config"}]
    for step in range(50, 550, 50):  # 230 images a step; one window holds a validation, two a checkpoint
        records.append({"kind": "train", "step": step, "images_seen": 230 * step, "time": step / 20,
                        "img_per_s": 1000 if step == 50 else 4000 if step in (200, 400, 450) else 4600})
        if step == 150:
            records.append({"kind": "validation", "step": step})
        if step in (350, 400):
            records.append({"kind": "checkpoint", "step": step, "name": "latest_model.pth"})
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = loop_windows(path)
    assert result["windows"] == 9 and result["img_per_s"] == 230 * 20  # after the first window: 450 steps in 22.5 s
    kinds = result["window_img_per_s"]
    assert kinds["validation"] == {"count": 1, "mean": 4000, "min": 4000}
    assert kinds["checkpoint"] == {"count": 2, "mean": 4000, "min": 4000}
    assert kinds["quiet"]["count"] == 6 and kinds["quiet"]["min"] == 4600
