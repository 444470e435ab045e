"""The file stages without servers: which inputs are files, what is refused, caps, scrubbing."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from config import Config, ConfigError
from delivery import ExchangeDelivery
from exchange import ExchangeUnavailable, Stored, with_retries
from files import FileStages
from inputs import (
    FILE_INPUTS,
    REFUSED_NODES,
    InputStager,
    LocalInputs,
    file_inputs_from_object_info,
    find_inputs,
    parse_name,
    rewrite,
)
from jobs import ClaimedJob, JobFailure
from outputs import collect, enforce_caps, published, tag_workflow
from pipeline import JobRun, drive


def load(value, class_type="LoadImage", input_name="image"):
    return {
        "1": {"class_type": class_type, "inputs": {input_name: value}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
    }


@pytest.mark.parametrize(
    ("value", "area", "name"),
    [
        ("photo.png", "user", "photo.png"),
        ("photo.png [input]", "user", "photo.png"),
        ("day1/photo.png", "user", "day1/photo.png"),
        ("shared/logo.png", "shared", "logo.png"),
        ("shared/set/a.png [input]", "shared", "set/a.png"),
        ("ümlaut näme.png", "user", "ümlaut näme.png"),
    ],
)
def test_names_a_participant_may_use(value, area, name) -> None:
    assert parse_name(value) == (area, name)


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("/outputs/bob/j/x.png", "absolute path"),
        ("/etc/passwd", "absolute path"),
        ("../bob/x.png", "'..'"),
        ("day1/../../bob/x.png", "'..'"),
        ("a//b.png", "empty"),
        ("./x.png", "'.'"),
        ("x.png [output]", "output folder"),
        ("bob/j/x.png [output]", "output folder"),
        ("x.png[output]", "output folder"),
        ("x.png [temp]", "temp folder"),
        ("a\0b.png", "NUL"),
        ("..\\bob\\x.png", "backslash"),
        ("", "empty"),
        ("shared", "shared folder"),
        (["5", 0], "link"),
        (7, "file name"),
    ],
)
def test_names_that_could_leave_the_participants_files_are_refused(value, why) -> None:
    with pytest.raises(ValueError, match=why):
        parse_name(value)


def test_refusal_names_the_node_the_input_and_the_reason() -> None:
    with pytest.raises(JobFailure) as info:
        find_inputs(load("/outputs/bob/j/x.png"))
    assert info.value.kind == "invalid_input"
    assert "node 1 (LoadImage) input 'image'" in info.value.message
    assert "absolute path" in info.value.message


@pytest.mark.parametrize(("class_type", "names"), sorted(FILE_INPUTS.items()))
def test_every_listed_loader_is_checked(class_type, names) -> None:
    with pytest.raises(JobFailure, match=names[0]):
        find_inputs(load("../x", class_type, names[0]))


def test_other_inputs_and_nodes_are_left_alone() -> None:
    wf = load("photo.png")
    wf["3"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "/etc/passwd"}}
    refs = find_inputs(wf)
    assert [(r.node_id, r.value) for r in refs] == [("1", "photo.png")]


def test_upload_flags_from_object_info_extend_the_list() -> None:
    info = {
        "VHS_LoadVideo": {
            "input": {"required": {"video": [["a.mp4"], {"video_upload": True}], "n": ["INT", {}]}}
        },
        "LoadAudio": {"input": {"required": {"audio": ["COMBO", {"audio_upload": True}]}}},
        "EmptyImage": {"input": {"required": {"width": ["INT", {"default": 512}]}}},
    }
    extra = file_inputs_from_object_info(info)
    assert extra == {"VHS_LoadVideo": ("video",), "LoadAudio": ("audio",)}
    with pytest.raises(JobFailure, match="VHS_LoadVideo"):
        find_inputs(load("/x.mp4", "VHS_LoadVideo", "video"), extra)


def test_rewrite_points_each_input_at_the_jobs_own_copy() -> None:
    wf = load("day1/photo.png [input]")
    wf["3"] = {"class_type": "LoadImageMask", "inputs": {"image": "shared/m.png", "channel": "a"}}
    refs = find_inputs(wf)
    out = rewrite(wf, refs, "job-1")
    assert out["1"]["inputs"]["image"] == "job-1/day1/photo.png"
    assert out["3"]["inputs"] == {"image": "job-1/shared/m.png", "channel": "a"}
    assert wf["1"]["inputs"]["image"] == "day1/photo.png [input]"  # the job's own copy is intact
    assert [r.remote("alice") for r in refs] == ["alice/day1/photo.png", "shared/m.png"]


@pytest.mark.parametrize("prefix", ["../x", "a/../../b", "/abs/x", "a\\b", "a\0b"])
def test_save_prefix_cannot_leave_the_jobs_folder(prefix) -> None:
    wf = load("x.png")
    wf["2"]["inputs"]["filename_prefix"] = prefix
    with pytest.raises(JobFailure, match="node 2 \\(SaveImage\\) input 'filename_prefix'"):
        tag_workflow(wf, "job-1")


def test_save_prefix_with_subfolders_is_kept() -> None:
    wf = load("x.png")
    wf["2"]["inputs"]["filename_prefix"] = "day1/portrait"
    assert tag_workflow(wf, "j")["2"]["inputs"]["filename_prefix"] == "j/day1/portrait"


def test_local_inputs_stay_inside_the_owners_folder(tmp_path: Path) -> None:
    root = tmp_path / "inputs"
    (root / "alice").mkdir(parents=True)
    (root / "bob").mkdir()
    (root / "bob" / "secret.png").write_bytes(b"bob's")
    (root / "alice" / "mine.png").write_bytes(b"alice's")
    (root / "alice" / "link.png").symlink_to(root / "bob" / "secret.png")
    stager = InputStager(LocalInputs(str(root)), str(tmp_path / "staging"), 1 << 20)

    async def stage(value):
        return await stager.stage("j1", "alice", find_inputs(load(value)))

    assert asyncio.run(stage("mine.png")) == 7
    assert (tmp_path / "staging" / "j1" / "mine.png").read_bytes() == b"alice's"
    with pytest.raises(JobFailure) as info:
        asyncio.run(stage("link.png"))
    assert info.value.kind == "input_missing" and "link.png" in info.value.message
    with pytest.raises(JobFailure, match="not among"):
        asyncio.run(stage("nothere.png"))
    stager.remove("j1")
    assert not (tmp_path / "staging" / "j1").exists()


def test_inputs_over_the_cap_fail_naming_it(tmp_path: Path) -> None:
    (tmp_path / "in" / "alice").mkdir(parents=True)
    (tmp_path / "in" / "alice" / "big.png").write_bytes(b"x" * 100)
    stager = InputStager(LocalInputs(str(tmp_path / "in")), str(tmp_path / "st"), 99)
    with pytest.raises(JobFailure, match="INPUT_MAX_JOB_BYTES") as info:
        asyncio.run(stager.stage("j", "alice", find_inputs(load("big.png"))))
    assert info.value.kind == "input_too_large"


def test_output_caps_name_the_setting() -> None:
    files = [
        {"filename": "a.png", "node_id": "9", "size": 60},
        {"filename": "b", "node_id": "9", "size": 50},
    ]
    enforce_caps(files, 100, 200)
    with pytest.raises(
        JobFailure, match=r"'a.png' of node 9 is 60 bytes, over OUTPUT_MAX_FILE_BYTES \(59\)"
    ):
        enforce_caps(files, 59, 200)
    with pytest.raises(JobFailure, match=r"110 bytes in all, over OUTPUT_MAX_JOB_BYTES \(100\)"):
        enforce_caps(files, 100, 100)


def test_result_paths_are_relative_to_the_outputs_root(tmp_path: Path) -> None:
    files = [{"path": str(tmp_path / "alice" / "j" / "sub" / "a.png"), "size": 1}]
    assert published(files, str(tmp_path))[0]["path"] == "alice/j/sub/a.png"


def test_errors_name_files_as_the_participant_wrote_them(tmp_path: Path) -> None:
    cfg = Config.from_env({"STAGING_DIR": str(tmp_path), "OUTPUTS_DIR": "/outputs"})
    stages = FileStages(cfg, None, None, None)  # type: ignore[arg-type]
    job = ClaimedJob("job-1", {}, 0)
    raw = JobFailure(
        "execution_error",
        f"Invalid image file: job-1/day1/a.png; at {tmp_path}/inputs/job-1/day1/a.png",
        {"traceback": [f"open('{tmp_path}/comfyui-output/x')"]},
    )
    clean = stages.scrub(job, raw)
    assert clean.message == "Invalid image file: day1/a.png; at day1/a.png"
    assert str(tmp_path) not in str(clean.details)


def test_cleanups_run_whatever_the_stage_did() -> None:
    ran = []

    async def failing(run):
        async def cleanup():
            ran.append("cleaned")

        run.cleanups.append(cleanup)
        raise JobFailure("x", "boom")

    async def never(run):
        ran.append("never")
        return True

    with pytest.raises(JobFailure):
        asyncio.run(drive([("a", failing), ("b", never)], JobRun(ClaimedJob("j", {}, 0))))
    assert ran == ["cleaned"]


class FlakyExchange:
    """Fails `failures` times, then stores what it is given; can also store it corrupted."""

    def __init__(self, failures: int, corrupt: bool = False) -> None:
        self.failures, self.corrupt, self.puts = failures, corrupt, []
        self.sizes: dict[str, int] = {}

    async def put(self, remote, local):
        if self.failures:
            self.failures -= 1
            raise ExchangeUnavailable("connection refused")
        self.puts.append(remote)
        self.sizes[remote] = Path(local).stat().st_size
        return Stored(self.sizes[remote], "a" * 64)

    async def read_back(self, remote, checksum):
        return Stored(self.sizes[remote], "b" * 64 if self.corrupt else "a" * 64)


def _job_folder(tmp_path: Path) -> tuple[str, list]:
    folder = tmp_path / "outputs" / "alice" / "j1"
    folder.mkdir(parents=True)
    (folder / "a.png").write_bytes(b"x")
    return str(folder), [{"path": str(folder / "a.png"), "size": 1}]


def test_delivery_retries_then_removes_the_local_copy(tmp_path: Path) -> None:
    folder, files = _job_folder(tmp_path)
    exchange = FlakyExchange(failures=2)
    delivery = ExchangeDelivery(exchange, str(tmp_path), 10, 0.01, retain=False)  # type: ignore[arg-type]
    asyncio.run(delivery.deliver("alice", "j1", folder, files))
    assert exchange.puts == ["alice/j1/a.png"] and files[0]["sha256"] == "a" * 64
    assert not Path(folder).exists()


def test_undeliverable_outputs_are_kept_and_the_job_says_where(tmp_path: Path) -> None:
    folder, files = _job_folder(tmp_path)
    delivery = ExchangeDelivery(
        FlakyExchange(failures=0, corrupt=True),  # type: ignore[arg-type]
        str(tmp_path),
        0.3,
        0.05,
        retain=False,
        host_path=lambda p: p.replace(str(tmp_path), "/mnt/scratch/temp/staging/worker-1"),
    )
    with pytest.raises(JobFailure) as info:
        asyncio.run(delivery.deliver("alice", "j1", folder, files))
    kept = tmp_path / "undelivered" / "alice" / "j1" / "a.png"
    assert kept.read_bytes() == b"x"
    assert info.value.kind == "delivery"
    assert "/mnt/scratch/temp/staging/worker-1/undelivered/alice/j1" in info.value.message
    assert "OUTPUT_DELIVERY_TIMEOUT" in info.value.message


def test_retries_stop_at_their_deadline() -> None:
    calls = []

    async def down():
        calls.append(1)
        raise ExchangeUnavailable("down")

    started = time.monotonic()
    with pytest.raises(ExchangeUnavailable):
        asyncio.run(with_retries(down, 0.5, 0.05))
    assert 2 <= len(calls) <= 20
    assert time.monotonic() - started < 2


def test_record_audio_is_a_file_input_although_it_has_no_list() -> None:
    with pytest.raises(JobFailure, match="node 1 \\(RecordAudio\\) input 'audio'"):
        find_inputs(load("/inputs/alice/voice.wav", "RecordAudio", "audio"))


@pytest.mark.parametrize("class_type", sorted(REFUSED_NODES))
def test_nodes_that_take_a_folder_name_are_refused(class_type) -> None:
    wf = load("x.png")
    wf["3"] = {"class_type": class_type, "inputs": {"folder": "alice"}}
    with pytest.raises(JobFailure, match=f"node 3 \\({class_type}\\)") as info:
        find_inputs(wf)
    assert info.value.kind == "invalid_input"


def test_a_second_annotation_after_input_is_refused() -> None:
    with pytest.raises(ValueError, match="output folder"):
        parse_name("a.png [output] [input]")
    with pytest.raises(ValueError, match="more than one annotation"):
        parse_name("a.png [input] [input]")


def test_a_linked_save_prefix_is_refused() -> None:
    wf = load("x.png")
    wf["2"]["inputs"]["filename_prefix"] = ["7", 0]
    with pytest.raises(JobFailure, match="must be a literal string"):
        tag_workflow(wf, "job-1")


def test_inputs_that_cannot_sit_side_by_side_fail_the_job_not_the_worker(tmp_path: Path) -> None:
    (tmp_path / "in" / "alice" / "e").mkdir(parents=True)
    (tmp_path / "in" / "alice" / "e" / "f").write_bytes(b"f")
    (tmp_path / "in" / "alice" / "g").write_bytes(b"g")
    stager = InputStager(LocalInputs(str(tmp_path / "in")), str(tmp_path / "st"), 1 << 20)
    wf = load("g")
    wf["3"] = {"class_type": "LoadImage", "inputs": {"image": "g/h"}}
    with pytest.raises(JobFailure, match="cannot be staged beside") as info:
        asyncio.run(stager.stage("j", "alice", find_inputs(wf)))
    assert str(tmp_path) not in info.value.message


def test_comfyui_input_folder_must_hold_nothing_else() -> None:
    with pytest.raises(ConfigError, match=r"COMFYUI_INPUT_DIR .* and INPUTS_DIR"):
        Config.from_env({"COMFYUI_INPUT_DIR": "/inputs"})
    with pytest.raises(ConfigError, match=r"COMFYUI_INPUT_DIR .* and OUTPUTS_DIR"):
        Config.from_env({"STAGING_DIR": "/outputs"})
    Config.from_env({"STAGING_DIR": "/staging"})


def test_files_a_node_saved_without_reporting_them_are_collected(tmp_path: Path) -> None:
    comfy_out = tmp_path / "comfy"
    (comfy_out / "j1" / "loras").mkdir(parents=True)
    (comfy_out / "j1" / "loras" / "mine.safetensors").write_bytes(b"w" * 10)
    dest = tmp_path / "dest"
    dest.mkdir()
    listed = asyncio.run(collect({}, str(dest), "j1", None, str(comfy_out)))  # type: ignore[arg-type]
    assert [(i["subfolder"], i["filename"], i["size"]) for i in listed] == [
        ("loras", "mine.safetensors", 10)
    ]
    assert not (comfy_out / "j1").exists()


def test_outputs_a_killed_run_left_in_transit_are_kept_at_start(tmp_path: Path) -> None:
    folder, _ = _job_folder(tmp_path)
    delivery = ExchangeDelivery(FlakyExchange(0), str(tmp_path), 1, 0.1, retain=False)  # type: ignore[arg-type]
    kept = delivery.keep_orphans()
    assert kept == [str(tmp_path / "undelivered" / "alice" / "j1")]
    assert (tmp_path / "undelivered" / "alice" / "j1" / "a.png").read_bytes() == b"x"
    assert not Path(folder).exists()


def test_one_deadline_covers_all_of_a_jobs_files(tmp_path: Path) -> None:
    folder = tmp_path / "outputs" / "alice" / "j1"
    folder.mkdir(parents=True)
    files = []
    for n in range(5):
        (folder / f"{n}.png").write_bytes(b"x")
        files.append({"path": str(folder / f"{n}.png"), "size": 1})

    class Slow(FlakyExchange):
        async def put(self, remote, local):
            await asyncio.sleep(0.3)
            raise ExchangeUnavailable("slow and down")

    delivery = ExchangeDelivery(Slow(0), str(tmp_path), 1.0, 0.05, retain=False)  # type: ignore[arg-type]
    started = time.monotonic()
    with pytest.raises(JobFailure, match="within 1 s"):
        asyncio.run(delivery.deliver("alice", "j1", str(folder), files))
    assert time.monotonic() - started < 3  # not 5 files x 1 s


def test_a_stopping_worker_gives_up_delivery_and_keeps_the_files(tmp_path: Path) -> None:
    folder, files = _job_folder(tmp_path)
    delivery = ExchangeDelivery(
        FlakyExchange(failures=1000),  # type: ignore[arg-type]
        str(tmp_path),
        60,
        0.05,
        retain=False,
        give_up=lambda: True,
    )
    started = time.monotonic()
    with pytest.raises(JobFailure, match="before the worker stopped"):
        asyncio.run(delivery.deliver("alice", "j1", folder, files))
    assert time.monotonic() - started < 5
    assert (tmp_path / "undelivered" / "alice" / "j1" / "a.png").exists()
