"""Profiling in a process group (two CPU processes, gloo, a file rendezvous): each process profiles
its own shard, and every process gets the profile of all the data in one process."""
from __future__ import annotations

import contextlib
import copy
import datetime
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from safetensors.torch import load_file, save_file

import modellego
from modellego.core.distributed import batch_share
from modellego.core.profile import Profile
from modellego.core.samples import SelectionConfig, select_samples
from modellego.errors import UserError

PROCESSES = 2


def _model_and_data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A seeded float64 net with a depthwise and a 1×1 convolution, and images that it mostly
    classifies correctly (labels from its own predictions, 30% redrawn)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, groups=6), nn.ReLU(),
                          nn.Conv2d(6, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                          nn.Linear(32, 4)).double().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 2, 8, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        logits = model(x)
        model[-1].bias -= logits.mean(0)  # centred logits: every class is predicted for some images
        y = model(x).argmax(1)
    wrong = torch.rand(96, generator=g) < 0.3
    y[wrong] = torch.randint(0, 4, (int(wrong.sum()),), generator=g)
    return model, x, y


def _saturated(model: nn.Module) -> nn.Module:
    """The model in float32 with its logits scaled up, so that the float32 probability of every
    correctly classified image is exactly 1.0."""
    hot = copy.deepcopy(model).float()
    with torch.no_grad():
        hot[-1].weight *= 1e5
        hot[-1].bias *= 1e5
    return hot


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _shard(x: torch.Tensor, y: torch.Tensor, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Uneven shards: every sample of the most frequent class goes to rank 0, so rank 1 has none."""
    top = int(torch.bincount(y).argmax())
    mine = (y == top) if rank == 0 else torch.zeros_like(y, dtype=torch.bool)
    mine |= (torch.arange(len(y)) % PROCESSES == rank) & (y != top)
    idx = mine.nonzero().flatten()
    return [(x[idx][i: i + 10], y[idx][i: i + 10]) for i in range(0, len(idx), 10)]


SELECT = dict(fraction=0.2, min_per_class=2, max_per_class=6)
KWARGS = [dict(select=SelectionConfig(**SELECT)),
          dict(select=SelectionConfig(**SELECT), class_chunk=1),
          dict(select=False)]


@contextlib.contextmanager
def _joined(rank: int, folder: str) -> Iterator[Path]:
    """This process joined to the group (left however the block ends): the output folder."""
    out = Path(folder)
    # A short timeout: collectives that fail to pair up fail the test instead of hanging it.
    dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank, world_size=PROCESSES,
                            timeout=datetime.timedelta(seconds=60))
    try:
        yield out
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _in_group(rank: int, folder: str) -> Iterator[tuple[Path, nn.Module, list]]:
    """This process joined to the group: the output folder, the model and this process's shard."""
    with _joined(rank, folder) as out:
        model, x, y = _model_and_data()
        yield out, model, _shard(x, y, rank)


def _worker(rank: int, folder: str) -> None:
    with _in_group(rank, folder) as (out, model, shard):
        for i, kwargs in enumerate(KWARGS):
            modellego.profile(model, shard, group=dist.group.WORLD, **kwargs).save(out / f"profile{i}-{rank}")
        # Chunks of classes chosen differently per process (one class, three): the smallest is used.
        modellego.profile(model, shard, group=dist.group.WORLD, **KWARGS[0],
                          class_chunk=1 if rank == 0 else 3).save(out / f"chunks-{rank}")
        for name, m, hold in [("selection", model, None), ("saturated", _saturated(model), None),
                              ("read-again", model, 0)]:
            sel = select_samples(m, [(x.to(_dtype(m)), y) for x, y in shard], group=dist.group.WORLD,
                                 hold_budget=hold, **SELECT)
            save_file({"inputs": sel.inputs.contiguous(), "labels": sel.labels}, out / f"{name}-{rank}")
        errors = []
        # Rank 1 without batches; then rank 1 with another fraction.
        for batches, fraction in [([] if rank == 1 else shard, 0.2), (shard, 0.3 if rank == 1 else 0.2)]:
            try:
                modellego.profile(model, batches, group=dist.group.WORLD, select=SelectionConfig(fraction))
            except UserError as e:
                errors.append(str(e))
        (out / f"errors-{rank}.json").write_text(json.dumps(errors))


def _gpu_worker(rank: int, folder: str) -> None:
    """Both processes on the one GPU: the sums live there, gloo carries them through the host."""
    with _in_group(rank, folder) as (out, model, shard):
        for i in (0, 1):
            modellego.profile(model.cuda(), shard, group=dist.group.WORLD, **KWARGS[i]).save(out / f"gpu{i}-{rank}")


def _spawn(worker, folder: Path) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the loopback device: nothing leaves the machine
    mp.spawn(worker, args=(str(folder),), nprocs=PROCESSES)


@pytest.fixture(scope="module")
def group_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("group")
    _spawn(_worker, folder)
    return folder


def _assert_all_processes_got(one: Profile, files: list[Path]) -> None:
    assert one.provenance["processes"] == 1
    for path in files:
        got = Profile.load(path)
        assert got.classes == one.classes and got.provenance["processes"] == PROCESSES
        assert got.provenance["selection"] == one.provenance["selection"]  # counts of all the shards
        assert got.provenance["missing"] == one.provenance["missing"]
        for k in one.layers:
            assert torch.equal(got.in_masks[k], one.in_masks[k]), (path.name, k)
            assert torch.equal(got.out_masks[k], one.out_masks[k]), (path.name, k)
    # The thresholds must cut through the layers, or equal masks would say little.
    assert any(0 < int(m.sum()) < m.numel() for m in one.in_masks.values())


@pytest.mark.parametrize("variant", range(len(KWARGS)))
def test_every_process_gets_the_profile_of_all_the_data(group_run: Path, variant: int) -> None:
    model, x, y = _model_and_data()
    _assert_all_processes_got(modellego.profile(model, [(x, y)], **KWARGS[variant]),
                              [group_run / f"profile{variant}-{rank}" for rank in range(PROCESSES)])


def test_processes_that_chunk_classes_differently_still_pair_up(group_run: Path) -> None:
    model, x, y = _model_and_data()
    _assert_all_processes_got(modellego.profile(model, [(x, y)], **KWARGS[0]),
                              [group_run / f"chunks-{rank}" for rank in range(PROCESSES)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_group_profiling_on_a_gpu_gets_the_profile_of_all_the_data(tmp_path: Path) -> None:
    _spawn(_gpu_worker, tmp_path)
    model, x, y = _model_and_data()
    for i in (0, 1):
        _assert_all_processes_got(modellego.profile(model.cuda(), [(x, y)], **KWARGS[i]),
                                  [tmp_path / f"gpu{i}-{rank}" for rank in range(PROCESSES)])


@pytest.mark.parametrize("name", ["selection", "saturated", "read-again"])
def test_the_shards_selected_samples_are_the_ones_one_process_selects(group_run: Path, name: str) -> None:
    model, x, y = _model_and_data()
    if name == "saturated":  # equal float32 probabilities: only the log-odds tell the images apart
        model = _saturated(model)
        x = x.float()
        assert int((model(x).softmax(1).amax(1) == 1.0).sum()) > len(x) // 2
    one = select_samples(model, [(x, y)], **SELECT)
    parts = [load_file(group_run / f"{name}-{rank}") for rank in range(PROCESSES)]
    assert all(len(p["labels"]) for p in parts)  # both processes hold a share
    got = torch.cat([p["inputs"] for p in parts])
    key = lambda t: sorted(map(tuple, t.flatten(1).tolist()))  # noqa: E731 (the samples as a set of rows)
    assert len(got) == len(one.inputs) and key(got) == key(one.inputs)


def test_a_process_without_data_or_with_other_arguments_fails_on_every_process(group_run: Path) -> None:
    for rank in range(PROCESSES):
        errors = json.loads((group_run / f"errors-{rank}.json").read_text())
        assert len(errors) == 2, errors
        assert "processes [1] got no batches" in errors[0]
        assert errors[1] == "the processes disagree on fraction (0.2, 0.3, in rank order)"


def test_a_group_without_torch_distributed_initialised_is_refused() -> None:
    model, x, y = _model_and_data()
    with pytest.raises(UserError, match="torch.distributed is not initialised"):
        modellego.profile(model, [(x, y)], group=object())  # type: ignore[arg-type]


CALIBRATIONS = ("recon+balance", "bn+refit+balance", "affine")


def _bn_model_and_component() -> tuple[nn.Module, nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A float64 net with BatchNorm, its component of classes 0-2 as cut, and batches of 10 images."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, groups=8), nn.ReLU(), nn.Conv2d(8, 12, 1), nn.BatchNorm2d(12),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(48, 4)).double()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    model.eval()
    x = torch.randn(80, 2, 8, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        model[-1].bias -= model(x).mean(0)  # centred logits: every class is predicted for some images
        y = model(x).argmax(1)
    batches = [(x[i:i + 10], y[i:i + 10]) for i in range(0, len(x), 10)]
    comp = modellego.disassemble(model, [0, 1, 2], batches=batches, calibrate="none",
                                 select=SelectionConfig(0.2, 2, 6))
    return model, comp, batches


def _calibration_worker(rank: int, folder: str) -> None:
    with _joined(rank, folder) as out:
        from modellego.calibration.calibrate import calibrate
        model, comp, batches = _bn_model_and_component()
        for i, method in enumerate(CALIBRATIONS):
            mine = copy.deepcopy(comp)
            report = calibrate(mine, model, [0, 1, 2], batch_share(batches, dist.group.WORLD), method,
                               group=dist.group.WORLD)
            save_file({k: v.contiguous() for k, v in mine.state_dict().items()}, out / f"calibrated{i}-{rank}")
            (out / f"report{i}-{rank}.json").write_text(json.dumps(report["images"]))


@pytest.fixture(scope="module")
def calibration_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("calibration")
    _spawn(_calibration_worker, folder)
    return folder


@pytest.mark.parametrize("i", range(len(CALIBRATIONS)))
def test_calibration_in_a_group_equals_one_process_on_all_the_shards(calibration_run: Path, i: int) -> None:
    from modellego.calibration.calibrate import calibrate
    from modellego.cut.disassemble import relative_error
    model, comp, batches = _bn_model_and_component()
    one = copy.deepcopy(comp)
    images = calibrate(one, model, [0, 1, 2], batches, CALIBRATIONS[i])["images"]
    want = one.state_dict()
    moved = 0.0
    for rank in range(PROCESSES):
        got = load_file(calibration_run / f"calibrated{i}-{rank}")
        assert json.loads((calibration_run / f"report{i}-{rank}.json").read_text()) == images  # of all shards
        for k, v in want.items():
            assert relative_error(got[k].double(), v.double()) < 1e-9, (CALIBRATIONS[i], k)
            moved = max(moved, relative_error(v.double(), comp.state_dict()[k].double()))
    assert moved > 1e-3  # the calibration changed the component: equal copies of the cut would pass too


def test_recon_samples_rows_in_these_calibrations() -> None:
    """The equality above covers recon's row sampling: its default samples fewer positions than
    these 8×8 maps have, and the sampled fit differs from the fit on every position."""
    from modellego.calibration.calibrate import plan_between
    from modellego.calibration.reconstruct import reconstruct
    from modellego.cut.disassemble import relative_error
    model, comp, batches = _bn_model_and_component()
    fits = []
    for rows in (32, 64):  # 64: every position of the first layer's 8×8 output
        one = copy.deepcopy(comp)
        reconstruct(one, model, plan_between(one, model), [x for x, _ in batches], rows_per_image=rows)
        fits.append(one.state_dict())
    assert max(relative_error(fits[0][k], fits[1][k]) for k in fits[0]) > 1e-3


def _streamed_shard(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rank's shard of the stream (every other sample, as StreamedBatches(shard=) reads), in batches of 7."""
    _, x, y = _model_and_data()
    xs, ys = x[rank::PROCESSES], y[rank::PROCESSES]
    return [(xs[i:i + 7], ys[i:i + 7]) for i in range(0, len(ys), 7)]


DRAWN = dict(select=SelectionConfig(**SELECT), calibration_images=30)


def _disassemble_worker(rank: int, folder: str) -> None:
    with _joined(rank, folder) as out:
        model, _, _ = _model_and_data()
        comp = modellego.disassemble(model, [0, 1, 2], batches=_streamed_shard(rank), group=dist.group.WORLD, **DRAWN)
        save_file({k: v.contiguous() for k, v in comp.state_dict().items()}, out / f"component-{rank}")
        provenance = modellego.get_info(comp).provenance
        (out / f"draw-{rank}.json").write_text(json.dumps([provenance["calibration_draw"], provenance["calibration"]]))


def test_disassemble_from_shards_equals_one_process_on_the_whole_stream(tmp_path: Path) -> None:
    """Profiling, the calibration draw (by stream position), recon's rows and the balance: the
    component of two processes is one process's, weight for weight."""
    from modellego.cut.disassemble import relative_error
    _spawn(_disassemble_worker, tmp_path)
    model, x, y = _model_and_data()
    one = modellego.disassemble(model, [0, 1, 2], batches=[(x[i:i + 10], y[i:i + 10]) for i in range(0, 96, 10)],
                                **DRAWN)
    info = modellego.get_info(one).provenance
    assert info["calibration_draw"]["images"] == 30 < int(torch.isin(y, torch.tensor([0, 1, 2])).sum())
    want = one.state_dict()
    for rank in range(PROCESSES):
        got = load_file(tmp_path / f"component-{rank}")
        assert json.loads((tmp_path / f"draw-{rank}.json").read_text()) == [info["calibration_draw"], info["calibration"]]
        assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
        for k, v in want.items():
            assert relative_error(got[k].double(), v.double()) < 1e-9, k


SCALINGS = ("calibrated", "density")  # "paper" reads the same gathered logits (this model's are not positive)


def _assembly_and_batches() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A padded assembly of two float64 components (classes 0-1 and 2-3) and batches labelled by its outputs."""
    model, _, batches = _bn_model_and_component()
    parts = [modellego.disassemble(model, task, batches=batches, calibrate="none", select=SelectionConfig(0.2, 2, 6))
             for task in ([0, 1], [2, 3])]
    return modellego.assemble(parts), batches


def _scaling_worker(rank: int, folder: str) -> None:
    with _joined(rank, folder) as out:
        asm, batches = _assembly_and_batches()
        for method in SCALINGS:
            one_batch = [(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))]
            share = batch_share(one_batch, dist.group.WORLD)  # fewer batches than processes: images split
            report = modellego.scale_assembly(asm, share, method, group=dist.group.WORLD)
            save_file({k: v.contiguous() for k, v in asm.state_dict().items()}, out / f"{method}-{rank}")
            (out / f"{method}-{rank}.json").write_text(json.dumps(report["images"]))


@pytest.fixture(scope="module")
def scaling_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("scaling")
    _spawn(_scaling_worker, folder)
    return folder


@pytest.mark.parametrize("method", SCALINGS)
def test_assembly_scaling_in_a_group_equals_one_process_on_all_the_shards(scaling_run: Path, method: str) -> None:
    from modellego.cut.disassemble import relative_error
    asm, batches = _assembly_and_batches()
    images = modellego.scale_assembly(asm, batches, method)["images"]
    want = asm.state_dict()
    assert not torch.equal(want["head.scale"], torch.ones_like(want["head.scale"]))  # the scaling did something
    for rank in range(PROCESSES):
        got = load_file(scaling_run / f"{method}-{rank}")
        assert json.loads((scaling_run / f"{method}-{rank}.json").read_text()) == images == 80
        assert got.keys() == want.keys()
        for k, v in want.items():
            assert relative_error(got[k].double(), v.double()) < 1e-6, (method, k)


def test_a_share_is_a_consecutive_run_of_whole_batches_or_else_of_images(monkeypatch: pytest.MonkeyPatch) -> None:
    import modellego.core.distributed as distributed
    batches = [(torch.arange(i, i + n), torch.arange(i, i + n)) for i, n in ((0, 4), (4, 4), (8, 4), (12, 2))]
    shares = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "world", lambda group, r=rank: (r, 3))
        shares.append(batch_share(batches, object()))  # type: ignore[arg-type]
    assert [[len(y) for _, y in s] for s in shares] == [[4], [4], [4, 2]]  # whole batches, in order
    assert torch.equal(torch.cat([y for s in shares for _, y in s]), torch.arange(14))
    shares = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "world", lambda group, r=rank: (r, 3))
        shares.append(batch_share(batches[:2], object()))  # type: ignore[arg-type]
    assert [[y.tolist() for _, y in s] for s in shares] == [[[0, 1]], [[2, 3], [4]], [[5, 6, 7]]]
