"""Push and pull through the real huggingface_hub client against a fake Hub on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_DISABLE_XET", "1")  # before huggingface_hub reads its env
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from svdq_format import hub as svdq_hub  # noqa: E402
from svdq_format.cli import main as cli_main  # noqa: E402
from svdq_format.errors import FormatError, HubError  # noqa: E402
from svdq_format.model import svdq_modules  # noqa: E402
from svdq_format.pretrained import load_pretrained  # noqa: E402
from tests.fakehub import FakeHub, git_sha1, sha256  # noqa: E402
from tests.hub_helpers import run, tiny_flux  # noqa: E402

REPO = "tester/tiny-flux-svdq"
FAST = {"retry_wait": 0.01}


@pytest.fixture(name="hub")  # named: other modules import it without shadowing their ``hub`` parameters
def hub_fixture(monkeypatch, tmp_path):
    """A running fake Hub; huggingface_hub pointed at it with a private cache and no Xet."""
    import huggingface_hub
    import huggingface_hub.constants as C

    server = FakeHub().start()
    monkeypatch.setattr(C, "ENDPOINT", server.url)
    monkeypatch.setattr(C, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(C, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", server.url)  # the module-level HfApi
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A sharded tiny Flux model directory, its model and reference output."""
    model = tiny_flux()
    d = tmp_path_factory.mktemp("flux")
    model.save_pretrained(d, max_shard_size="120KB")
    (d / "fidelity.json").write_text(json.dumps({"metrics": {"psnr_db": 31.25, "lpips": 0.071}}))
    return d, model, run(model)


def local_files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def cache_is_clean(cache: Path) -> None:
    """Every blob hashes to its name (the ETag) and no partial download is left."""
    assert not list(cache.rglob("*.incomplete"))
    for blob in cache.glob("models--*/blobs/*"):
        data = blob.read_bytes()
        assert blob.name in (sha256(data), git_sha1(data)), f"corrupt blob {blob.name} in the cache"


def push(hub: FakeHub, d: Path, repo: str = REPO, **kw):
    return svdq_hub.push_to_hub(d, repo, token="t", endpoint=hub.url, **FAST, **kw)


def test_push_pull_round_trip_bit_identical(hub, model_dir, tmp_path):
    d, model, ref = model_dir
    info = push(hub, d)
    remote = hub.files(REPO)
    assert remote[".gitattributes"]  # from repo creation
    local = local_files(d)
    assert {k: remote[k] for k in local} == local  # every file, byte for byte, in one commit
    assert hub.repos[REPO].branches["main"] == info.oid
    assert len(hub.repos[REPO].commits) == 2
    assert set(hub.lfs_objects) == {sha256(v) for k, v in local.items() if k.endswith(".safetensors")}

    path = svdq_hub.pull(REPO, endpoint=hub.url, **FAST)
    assert local_files(path) | {} == {k: v for k, v in remote.items()}
    loaded = load_pretrained(path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert torch.equal(run(loaded), ref)

    # the diffusers route, by repo id
    from diffusers import FluxTransformer2DModel

    by_id = FluxTransformer2DModel.from_pretrained(REPO, cache_dir=str(tmp_path / "diffusers-cache"))
    assert set(svdq_modules(by_id)) == set(svdq_modules(model))
    assert torch.equal(run(by_id), ref)


def test_second_pull_hits_cache_then_offline(hub, model_dir, monkeypatch):
    d, _, ref = model_dir
    push(hub, d)
    first = svdq_hub.pull(REPO, endpoint=hub.url, **FAST)
    n_gets = sum(1 for m, p in hub.requests if m == "GET" and "/resolve/" in p)
    assert n_gets == len(local_files(d)) + 2  # every file once (+ .gitattributes, README.md)
    hub.requests.clear()
    second = svdq_hub.pull(REPO, endpoint=hub.url, **FAST)
    assert second == first
    assert not [r for r in hub.requests if "/resolve/" in r[1]]  # no file transferred or even HEADed

    hub.stop()  # the Hub is gone: cache only
    assert svdq_hub.pull(REPO, endpoint=hub.url, local_files_only=True) == first
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    assert svdq_hub.pull(REPO, endpoint=hub.url) == first
    assert torch.equal(run(svdq_hub.from_pretrained(REPO, endpoint=hub.url)), ref)
    with pytest.raises(HubError, match="pull tester/never-pulled@main: .*cache"):
        svdq_hub.pull("tester/never-pulled", endpoint=hub.url, retries=0)


def test_revision_selects_that_revision(hub, model_dir, tmp_path):
    d, model, ref = model_dir
    v1 = push(hub, d).oid
    model2 = tiny_flux(rank=16)
    ref2 = run(model2)
    model2.save_pretrained(tmp_path / "v2")
    v2 = push(hub, tmp_path / "v2", commit_message="rank 16").oid
    push(hub, d, revision="dev")  # branch created from main (v2), then v1 files committed on it
    assert v1 != v2 and hub.repos[REPO].branches["main"] == v2

    assert torch.equal(run(load_pretrained(svdq_hub.pull(REPO, revision=v1, endpoint=hub.url))), ref)
    assert torch.equal(run(load_pretrained(svdq_hub.pull(REPO, endpoint=hub.url))), ref2)
    dev = svdq_hub.pull(REPO, revision="dev", endpoint=hub.url)
    assert (dev / "diffusion_pytorch_model.safetensors.index.json").is_file()
    cfg = json.loads((svdq_hub.pull(REPO, revision=v1, endpoint=hub.url) / "config.json").read_text())
    assert {s["rank"] for s in cfg["quantization_config"]["layers"].values()} == {8}
    with pytest.raises(HubError, match="pull tester/tiny-flux-svdq@nope: .*(Revision|rev)"):
        svdq_hub.pull(REPO, revision="nope", endpoint=hub.url, **FAST)


PULL_FAULTS = [
    ("500", "GET", "/revision/"),                  # revision info: HTTP 500 once
    ("500", "HEAD", ".safetensors"),              # file metadata: HTTP 500 once
    ("hangup", "GET", "/tree/"),                   # tree listing: connection closed, no answer
    ("drop", "GET", "00002-of-"),                  # a shard: connection dropped mid-body
    ("truncate", "GET", "00001-of-"),              # a shard: complete response, half the bytes
    ("wrong_etag", "HEAD", "00003-of-"),           # a shard: ETag of other content
    ("wrong_etag", "HEAD", "config.json"),         # a regular file: wrong git blob id
]


@pytest.mark.parametrize("kind,method,where", PULL_FAULTS, ids=[f"{k}-{m}-{w.strip('/')}" for k, m, w in PULL_FAULTS])
def test_pull_recovers_from_fault(hub, model_dir, kind, method, where):
    d, _, ref = model_dir
    push(hub, d)
    hub.inject(kind, method=method, path_contains=where)
    path = svdq_hub.pull(REPO, endpoint=hub.url, **FAST)
    assert hub.fault_log and hub.fault_log[0][0] == kind  # the fault did fire
    assert local_files(path) == hub.files(REPO)
    cache_is_clean(Path(hub_cache()))
    assert torch.equal(run(load_pretrained(path)), ref)


@pytest.mark.parametrize("kind,method,where", [PULL_FAULTS[i] for i in (0, 4, 5)],
                         ids=["500", "truncate", "wrong_etag"])
def test_pull_persistent_fault_fails_cleanly(hub, model_dir, kind, method, where):
    d, _, _ = model_dir
    push(hub, d)
    hub.inject(kind, method=method, path_contains=where, times=1000)
    with pytest.raises(HubError, match=r"pull tester/tiny-flux-svdq@main: failed after 3 attempts: "):
        svdq_hub.pull(REPO, endpoint=hub.url, retries=2, **FAST)
    assert len(hub.fault_log) >= 3
    cache_is_clean(Path(hub_cache()))


def hub_cache() -> str:
    import huggingface_hub.constants as C

    return C.HF_HUB_CACHE


@pytest.mark.parametrize("kind,method,where", [
    ("500", "POST", "/commit/"), ("hangup", "POST", "/commit/"), ("500", "POST", "/preupload/"),
    ("500", "POST", "/api/repos/create"), ("hangup", "PUT", "/_lfs/"),
], ids=["commit-500", "commit-hangup", "preupload-500", "create-500", "lfs-put-hangup"])
def test_push_recovers_from_fault(hub, model_dir, kind, method, where):
    d, _, _ = model_dir
    hub.inject(kind, method=method, path_contains=where)
    info = push(hub, d)
    assert hub.fault_log and hub.fault_log[0][0] == kind
    repo = hub.repos[REPO]
    assert repo.branches["main"] == info.oid and len(repo.commits) == 2  # exactly one upload commit
    local = local_files(d)
    assert {k: hub.files(REPO)[k] for k in local} == local
    assert all(sha256(v) == k for k, v in hub.lfs_objects.items())  # remote LFS store: no bad bytes


def test_push_persistent_fault_leaves_remote_untouched(hub, model_dir):
    d, _, _ = model_dir
    hub.inject("500", method="POST", path_contains="/commit/", times=1000)
    with pytest.raises(HubError, match=r"push .* to tester/tiny-flux-svdq@main: failed after 2 attempts: .*500"):
        push(hub, d, retries=1)
    assert set(hub.files(REPO)) == {".gitattributes"}  # nothing half-committed
    assert all(sha256(v) == k for k, v in hub.lfs_objects.items())


@pytest.mark.parametrize("times", [1, 1000], ids=["once", "always"])
def test_push_damaged_upload_is_refused_by_the_server(hub, model_dir, times):
    d, _, _ = model_dir
    hub.inject("corrupt", method="PUT", path_contains="/_lfs/", times=times)
    if times == 1:
        info = push(hub, d)  # retried; the good bytes land
        assert hub.repos[REPO].branches["main"] == info.oid
    else:
        with pytest.raises(HubError, match=r"push .* to tester/tiny-flux-svdq@main: failed after 2 attempts: "
                                           r"Error while uploading .*Bad request: "
                                           r"content does not hash to [0-9a-f]{64}"):
            push(hub, d, retries=1)
        assert set(hub.files(REPO)) == {".gitattributes"}
    assert hub.fault_log and hub.fault_log[0][0] == "corrupt"
    assert all(sha256(v) == k for k, v in hub.lfs_objects.items())  # never stored under a wrong name


def test_push_refuses_invalid_checkpoint(hub, model_dir, tmp_path):
    d, _, _ = model_dir
    bad = tmp_path / "bad"
    bad.mkdir()
    for name, data in local_files(d).items():
        (bad / name).write_bytes(data)
    shard = sorted(bad.glob("*-00001-of-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(FormatError, match="truncated|trailing|beyond"):
        push(hub, bad)
    assert REPO not in hub.repos  # nothing created, nothing uploaded


def test_model_card_metadata_parses_back(hub, model_dir):
    from huggingface_hub import ModelCard

    d, model, _ = model_dir
    push(hub, d, license="apache-2.0")
    card = ModelCard.load(svdq_hub.pull(REPO, endpoint=hub.url) / "README.md")
    data = card.data
    assert data.base_model == "tiny/base"
    assert data.base_model_relation == "quantized"
    assert data.library_name == "svdquant"
    assert data.license == "apache-2.0"
    assert {"svdquant", "int4", "diffusers", "4-bit"} <= set(data.tags)
    assert data.svdquant["layers"] == len(svdq_modules(model)) and data.svdquant["rank"] == [8]
    assert data.svdquant["model_class"] == "FluxTransformer2DModel"
    assert "| psnr_db | 31.25 |" in card.text and "| lpips | 0.071 |" in card.text
    assert f'FluxTransformer2DModel.from_pretrained("{REPO}")' in card.text
    assert '| quantizer | {"rank": 8} |' in card.text


def test_cli_push_and_pull(hub, model_dir, capsys):
    d, _, ref = model_dir
    args = ["--endpoint", hub.url, "--token", "t"]
    assert cli_main(["push", str(d), REPO, "--private", "--revision", "release", "--commit-message", "cli upload",
                     *args]) == 0
    out = capsys.readouterr().out
    repo = hub.repos[REPO]
    assert repo.private and f"commit {repo.branches['release']}" in out
    assert repo.commits[repo.branches["release"]].message == "cli upload"
    assert cli_main(["pull", REPO, "--revision", "release", "--include", "*.json", *args]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors.index.json",
                                                      "fidelity.json"]
    # private: no token → a clear error, exit status 1
    assert cli_main(["pull", REPO, "--endpoint", hub.url]) == 1
    assert "error: pull tester/tiny-flux-svdq@main:" in capsys.readouterr().err
    assert cli_main(["pull", REPO, "--revision", "release", *args]) == 0
    assert torch.equal(run(load_pretrained(Path(capsys.readouterr().out.strip()))), ref)


def test_push_model_object_and_save_pretrained_push(hub, tmp_path):
    model = tiny_flux()
    info = svdq_hub.push_to_hub(model, "tester/from-object", token="t", endpoint=hub.url, max_shard_size="50KB", **FAST)
    files = hub.files("tester/from-object")
    assert "README.md" in files and "diffusion_pytorch_model.safetensors.index.json" in files
    assert hub.repos["tester/from-object"].branches["main"] == info.oid
    digest = hashlib.sha256(files["config.json"]).hexdigest()
    assert digest == sha256(files["config.json"])


def test_pipeline_folder_push_and_load_by_subfolder(hub, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from huggingface_hub import ModelCard

    model = tiny_flux()
    ref = run(model)
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=model)
    pipe.save_pretrained(tmp_path / "pipe")
    push(hub, tmp_path / "pipe", "tester/tiny-flux-pipeline")
    remote = hub.files("tester/tiny-flux-pipeline")
    assert {"model_index.json", "transformer/config.json", "scheduler/scheduler_config.json",
            "README.md"} <= set(remote)
    by_id = FluxTransformer2DModel.from_pretrained("tester/tiny-flux-pipeline", subfolder="transformer",
                                                   cache_dir=str(tmp_path / "dc"))
    assert torch.equal(run(by_id), ref)
    ours = svdq_hub.from_pretrained("tester/tiny-flux-pipeline", subfolder="transformer", endpoint=hub.url)
    assert torch.equal(run(ours), ref)
    card = ModelCard(remote["README.md"].decode())
    assert card.data.svdquant["model_class"] == "FluxTransformer2DModel"
    assert 'from_pretrained("tester/tiny-flux-pipeline", subfolder="transformer")' in card.text
    (tmp_path / "empty").mkdir()
    with pytest.raises(FormatError, match="no SVDQuant model here"):
        push(hub, tmp_path / "empty", "tester/nothing")
