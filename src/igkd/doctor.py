"""``igkd doctor``: run every accelerator path once on tiny data, one line per path, before real work.

A GPU job here is rare and short; a CUDA-only bug found by the first study costs the job. The
doctor runs each path the training and deployment code takes on the device (seconds on tiny
in-memory data, no dataset files, no optional packages needed) and prints ``ok``, ``FAILED``
(with why) or ``not checked`` (why not) per path. It exits non-zero if any path failed.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from igkd.errors import IgkdError

OK, FAILED, SKIPPED = "ok", "FAILED", "not checked"


class NotChecked(Exception):
    """A path that cannot run here (no GPU, a missing optional package); says why."""


def tiny_dataset(n_train: int = 64, n_test: int = 32, size: int = 16, classes: int = 4, seed: int = 0, name: str = "tiny"):
    """A learnable toy problem built in memory: class c has a bright square in quadrant c, plus noise
    (the doctor's data, and the test suite's ``tiny_dataset`` fixture)."""
    from igkd.data.dataset import Dataset, ImageSet, content_fingerprint

    generator = torch.Generator().manual_seed(seed)

    def split(n):
        labels = torch.arange(n) % classes
        images = torch.randint(0, 60, (n, 3, size, size), generator=generator).to(torch.uint8)
        half = size // 2
        for i, c in enumerate(labels.tolist()):
            r, q = divmod(c % 4, 2)
            images[i, :, r * half : (r + 1) * half, q * half : (q + 1) * half] += 150
        return ImageSet(images, labels.long())

    train, test = split(n_train), split(n_test)
    fingerprint = content_fingerprint(train.images, train.labels, test.images, test.labels, extra=name)
    return Dataset(name, tuple(f"c{i}" for i in range(classes)), train, test, fingerprint, "memory")


class Doctor:
    def __init__(self, device: torch.device, folder: Path, compile_check: bool):
        self.device, self.folder, self.compile_check = device, folder, compile_check
        self.cuda = device.type == "cuda"
        self.data = tiny_dataset(n_train=96, name="doctor")
        torch.manual_seed(0)
        from igkd.models import build_model

        self.teacher = build_model("teacher", width=0.25, num_classes=4).eval()

    def _config(self, method: str = "kd_ig_at", **overrides):
        from igkd.distill import resolve_config

        values = dict(student="k13", width=0.5, epochs=1, batch_size=32, val_fraction=0.25, device=str(self.device))
        return resolve_config(method, "paper", **{**values, **overrides})

    def _maps(self):
        return torch.rand(len(self.data.train), 16, 16, generator=torch.Generator().manual_seed(0)).half()

    def _train(self, name: str, config, **kwargs) -> dict:
        from igkd.distill import train

        return train(config, self.data, self.folder / name, teacher=self.teacher, ig_maps=self._maps(), progress=False, **kwargs)

    # -- the paths ---------------------------------------------------------------------------
    def loader_and_overlay(self) -> str:
        from igkd.data import DeviceLoader
        from igkd.distill.overlay import ig_overlay

        images = self.data.train.images.to(self.device)
        maps = images[:, 0].float()  # each image's own red channel as its "map": must get the same crop/flip
        loader = DeviceLoader(images, self.data.train.labels, 32, extras={"ig": maps}, seed=1)
        for batch in loader:
            red = batch.images[:, 0] * 255
            if not torch.allclose(red, batch.extras["ig"], atol=1e-3):
                raise AssertionError("an IG map did not receive its image's crop/flip")
            out = ig_overlay(batch.images, batch.extras["ig"], 1.0, torch.Generator(device=self.device).manual_seed(0))
            if not (out.device.type == self.device.type and torch.isfinite(out).all()):
                raise AssertionError("overlay output is not finite on the device")
        return f"{len(loader)} batches, maps aligned with their crops/flips"

    def training_step(self) -> str:
        summary = self._train("step", self._config())
        precision = "bf16 autocast" if self.cuda else "fp32"
        return f"kd_ig_at k13 + teacher, {precision}: loss finite, test {summary['test_accuracy']:.1f}% after 1 epoch"

    def compiled_step(self) -> str:
        if not self.cuda and not self.compile_check:
            raise NotChecked("slow on a CPU; add --compile-check to run it")
        summary = self._train("compiled", self._config(compile=True))
        return f"torch.compile of the step: 1 epoch, test {summary['test_accuracy']:.1f}%"

    def cuda_graph(self) -> str:
        raise NotChecked("no code path captures CUDA graphs yet")

    def checkpoint_resume(self) -> str:
        config = self._config("kd", epochs=2)
        self._train("straight", config)

        def stop(epoch, _record):
            raise KeyboardInterrupt

        with contextlib.suppress(KeyboardInterrupt):
            self._train("resumed", config, on_epoch_end=stop)
        self._train("resumed", config, resume=True)
        from igkd.models import load_model

        a = load_model(self.folder / "straight" / "model.safetensors")[0].state_dict()
        b = load_model(self.folder / "resumed" / "model.safetensors")[0].state_dict()
        worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())
        if not self.cuda and worst != 0.0:
            raise AssertionError(f"resumed weights differ from an uninterrupted run by {worst:.3g} on the CPU")
        return f"save -> resume on {self.device.type}: max |weight difference| {worst:.3g}" + (" (CUDA is not bit-reproducible)" if self.cuda else "")

    def integrated_gradients(self) -> str:
        from igkd.attribution.integrated_gradients import choose_precision, integrated_gradients_attribution

        teacher = self.teacher.to(self.device)
        x = self.data.train.images[:8].to(self.device).float() / 255
        labels = self.data.train.labels[:8].to(self.device)
        fp32 = integrated_gradients_attribution(teacher, x, labels, n_steps=16, precision="fp32")
        gain = fp32.values.sum((1, 2, 3)) - fp32.delta
        text = f"fp32 completeness error {100 * float(fp32.delta.abs().sum() / gain.abs().sum().clamp_min(1e-12)):.2f}%"
        if self.cuda:
            bf16 = integrated_gradients_attribution(teacher, x, labels, n_steps=16, precision="bf16")
            chosen, check = choose_precision(fp32.values, bf16.values, gain)
            text += f"; bf16 {100 * check['completeness_bf16']:.2f}%, map correlation {check['map_correlation']:.4f}: auto picks {chosen}"
        else:
            text += "; bf16 not checked (CUDA only)"
        return text

    def ddp_one_process(self) -> str:
        import torch.distributed as dist

        if dist.is_initialized():
            raise NotChecked("a process group is already initialised")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        backend = "nccl" if self.cuda else "gloo"
        saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        try:
            dist.init_process_group(backend, rank=0, world_size=1)
            from igkd.models import build_model

            model = build_model("k17", num_classes=4).to(self.device)
            ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[self.device.index or 0] if self.cuda else None)
            loss = ddp(torch.rand(4, 3, 16, 16, device=self.device)).sum()
            loss.backward()
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        return f"{backend}, world size 1: DDP forward/backward"

    def latency(self) -> str:
        from igkd.deploy.latency import measure_latency

        result = measure_latency(self.teacher, batch_size=8, device=self.device, warmup=3, repeats=20, image_size=(16, 16))
        return f"eager teacher, batch 8 on {self.device.type}: median {result['median_ms']:.2f} ms" + (" (synchronised)" if self.cuda else "")

    def onnx_export(self) -> str:
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError as err:
            raise NotChecked(f"{err.name} is not installed (pip install 'igkd[deploy]')") from None
        from igkd.deploy.export import export_model
        from igkd.models import build_model

        report = export_model(build_model("k13", num_classes=4).eval(), self.folder / "k13.onnx", "onnx")
        return f"k13 to ONNX, parity max |diff| {report['parity']['max_abs_diff']:.2g}"


CHECKS: tuple[tuple[str, str], ...] = (
    ("loader_and_overlay", "device-resident loader + IG overlay"),
    ("training_step", "training step (student + teacher)"),
    ("compiled_step", "torch.compile of the step"),
    ("cuda_graph", "CUDA-graph capture"),
    ("checkpoint_resume", "checkpoint save -> resume"),
    ("integrated_gradients", "integrated gradients fp32/bf16"),
    ("ddp_one_process", "DDP init, one process"),
    ("latency", "latency timing"),
    ("onnx_export", "ONNX export + parity"),
)


def run_doctor(device: str = "auto", *, compile_check: bool = False, say: Callable[[str], None] | None = None) -> dict:
    """Run every check; returns {"environment", "checks": [{name, path, status, detail, seconds}], "failed"}."""
    from igkd.devices import resolve_device
    from igkd.provenance import environment

    target = resolve_device(device)
    results = []
    with tempfile.TemporaryDirectory(prefix="igkd-doctor-") as tmp:
        doctor = Doctor(target, Path(tmp), compile_check)
        for name, path in CHECKS:
            started = time.perf_counter()
            try:
                status, detail = OK, getattr(doctor, name)()
            except NotChecked as why:
                status, detail = SKIPPED, str(why)
            except Exception as err:  # every failure is reported, none stops the others
                first = (str(err).strip().splitlines() or [""])[0]
                status, detail = FAILED, f"{type(err).__name__}: {first[:300]}"
            seconds = round(time.perf_counter() - started, 2)
            results.append({"name": name, "path": path, "status": status, "detail": detail, "seconds": seconds})
            if say:
                say(f"{status:<11} {path:<36} {detail} ({seconds:.1f} s)")
    failed = [r["name"] for r in results if r["status"] == FAILED]
    return {"format": "igkd-doctor", "environment": environment(target), "checks": results, "failed": failed}


def register(app) -> None:
    import json

    import typer

    @app.command("doctor")
    def doctor_command(
        device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
        out: Optional[Path] = typer.Option(None, help="Also write the results as JSON here."),
        compile_check: bool = typer.Option(False, "--compile-check", help="Also run the torch.compile check on a CPU (slow)."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON only."),
    ) -> None:
        """Run every accelerator path once on tiny data (loader, bf16 step, compile, resume, IG, DDP, latency, ONNX)."""
        from igkd.atomic import atomic_write_json

        say = None if as_json else print
        result = run_doctor(device, compile_check=compile_check, say=say)
        if out is not None:
            if out.parent and not out.parent.exists():
                raise IgkdError(f"cannot write {out}: folder {out.parent} does not exist")
            atomic_write_json(out, result)
        if as_json:
            print(json.dumps(result, indent=2, default=str))
        else:
            skipped = [r["path"] for r in result["checks"] if r["status"] == SKIPPED]
            env = result["environment"]
            print(f"{len(result['checks']) - len(skipped) - len(result['failed'])} ok, {len(result['failed'])} failed, "
                  f"{len(skipped)} not checked on {env['device_name']} (torch {env['torch']})")
            if not env["device"].startswith("cuda"):
                print("the GPU paths (bf16 autocast step, bf16 IG, NCCL, synchronised CUDA timing) were not checked: no CUDA device used")
        if result["failed"]:
            print(f"error: doctor found failing paths: {', '.join(result['failed'])}", file=sys.stderr)
            raise typer.Exit(1)
