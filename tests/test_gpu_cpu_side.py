"""The GPU path's CPU side: the factory's path reporting and kernel policy where the kernels import.

mamba-ssm cannot run on this machine (no CUDA), and is not installed. Its stand-ins below are
packages with the same import paths whose ops raise when called: transformers binds them exactly as
it binds the real kernels when they import, so the factory is exercised as on a machine that has the
`gpu` extra. Transformers binds its Mamba ops once per process, so each scenario runs in a fresh
interpreter and reports back as JSON. The GPU itself is covered by tests/test_gpu.py.

GPU fractions in simulation need no GPU either: Ray schedules logical GPUs (`init_args.num_gpus`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAKE_CALLED = "fake GPU kernel called"

_FAKE_FILES = {
    "mamba_ssm/__init__.py": "",
    "mamba_ssm/ops/__init__.py": "",
    "mamba_ssm/ops/triton/__init__.py": "",
    "mamba_ssm/ops/triton/ssd_combined.py": (
        f"def _kernel(*args, **kwargs):\n    raise RuntimeError({FAKE_CALLED!r})\n\n"
        "mamba_split_conv1d_scan_combined = mamba_chunk_scan_combined = _kernel\n"
    ),
    "mamba_ssm/ops/triton/selective_state_update.py": (
        "from mamba_ssm.ops.triton.ssd_combined import _kernel as selective_state_update\n"
    ),
    "mamba_ssm/ops/selective_scan_interface.py": (
        "from mamba_ssm.ops.triton.ssd_combined import _kernel as mamba_inner_fn, _kernel as selective_scan_fn\n"
    ),
    "causal_conv1d/__init__.py": (
        "from mamba_ssm.ops.triton.ssd_combined import _kernel as causal_conv1d_fn, _kernel as causal_conv1d_update\n"
    ),
}

# Trains one step in training mode: "ok", or the error (the stand-ins raise FAKE_CALLED when reached).
TRAIN_STEP = """
def train_step(model):
    x = torch.randint(4, 260, (1, 32))
    try:
        model.train()(input_ids=x, labels=x).loss.backward()
        return "ok"
    except RuntimeError as err:
        return str(err)

def as_if_on_cuda():
    # No GPU here: make the factory's routing see every tensor as a CUDA one
    factory._on_cuda = lambda args, kwargs: True
"""

# Scenario 1: a fresh process asks for `never` before anything has imported transformers' Mamba code.
NEVER_FIRST = """
import json, sys, torch
from fedem_flwr.config.schema import ModelConfig
from fedem_flwr.model import factory
from fedem_flwr.model.tokenizer import build_byte_tokenizer
""" + TRAIN_STEP + """
out = {"available": factory.kernels_available(), "imported_by_probe": "mamba_ssm" in sys.modules}
model = factory.build_model(ModelConfig(kernels="never"), build_byte_tokenizer())
out["kernels_imported"] = "mamba_ssm" in sys.modules and "causal_conv1d" in sys.modules
out["cpu_train"] = train_step(model)
as_if_on_cuda()
out["cuda_train"] = train_step(model)
print(json.dumps(out))
"""

# Scenario 2: `auto`, `require`, then `never`, on a CPU where the kernel packages import.
AUTO_ON_CPU = """
import json, sys, torch
from fedem_flwr.config.schema import ModelConfig
from fedem_flwr.errors import KernelsUnavailable
from fedem_flwr.model import factory
from fedem_flwr.model.tokenizer import build_byte_tokenizer
""" + TRAIN_STEP + """
tokenizer = build_byte_tokenizer()
model = factory.build_model(ModelConfig(), tokenizer)
out = {"imported": "mamba_ssm" in sys.modules and "causal_conv1d" in sys.modules,
       "path": factory.kernel_path(model)}
try:
    factory.build_model(ModelConfig(kernels="require"), tokenizer)
    out["require"] = None
except KernelsUnavailable as err:
    out["require"] = str(err)
x = torch.randint(4, 260, (1, 32))
try:
    with torch.no_grad():
        model.eval()(input_ids=x, labels=x)
    out["eval"] = "ok"
except RuntimeError as err:
    out["eval"] = str(err)
out["train"] = train_step(model)
as_if_on_cuda()
out["cuda_train"] = train_step(model)
factory.build_model(ModelConfig(kernels="never"), tokenizer)
out["cuda_train_after_never"] = train_step(model)
print(json.dumps(out))
"""


# Scenario 3: a GPU machine as transformers' own checks see it (CUDA, both packages installed); whether
# the packages then import decides. Nothing here touches a device.
AS_ON_A_GPU_MACHINE = """
import json, torch
torch.cuda.is_available = lambda: True
from transformers.utils import import_utils
for check in ("is_mamba_2_ssm_available", "is_mamba_ssm_available", "is_causal_conv1d_available"):
    setattr(import_utils, check, lambda: True)
from fedem_flwr.model.factory import kernels_available
print(json.dumps({"mamba2": kernels_available("mamba2"), "mamba": kernels_available("mamba")}))
"""

# Scenario 4: a GPU machine that carries neither `datasets` nor flwr-datasets trains and evaluates.
WITHOUT_DATASETS = """
import json, sys
class NoDatasets:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("datasets", "flwr_datasets"):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, NoDatasets())
import torch
import fedem_flwr.training, fedem_flwr.training.finetune, fedem_flwr.gate.loss, fedem_flwr.data.labels
from fedem_flwr.config.schema import LoraConfig, ModelConfig, TrainConfig
from fedem_flwr.model.lora import attach_lora
from fedem_flwr.model.tokenizer import build_byte_tokenizer
from fedem_flwr.model.factory import build_model
from fedem_flwr.gate.loss import evaluate
from fedem_flwr.training.finetune import train
tokenizer = build_byte_tokenizer()
model = attach_lora(build_model(ModelConfig(), tokenizer), LoraConfig())
blocks = torch.randint(4, 260, (4, 32), generator=torch.Generator().manual_seed(0))
result = train(model, blocks, TrainConfig(max_steps=1, batch_size=2, device="cpu", progress=False),
               pad_id=tokenizer.pad_token_id)
loss = evaluate(model, {"x": blocks}, pad_id=tokenizer.pad_token_id)["x"]["loss"]
print(json.dumps({"steps": result.steps, "loss": loss,
                  "imported": sorted(n for n in ("datasets", "flwr_datasets") if n in sys.modules)}))
"""

# Scenario 5: two virtual clients asking for half a GPU each share one logical GPU, at the same time.
GPU_FRACTIONS = """
import json, os, sys, time
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

client, server, replies = ClientApp(), ServerApp(), []

@client.query("where")
def where(message: Message, context: Context) -> Message:
    import ray
    # A rendezvous, not a timing: each call waits (up to 60 s) until both calls have started, which
    # happens only if Ray runs the two half-GPU clients at once, however loaded the machine.
    folder = RENDEZVOUS  # the test's own folder, written into this code
    open(os.path.join(folder, str(context.node_id)), "w").close()
    deadline = time.time() + 60
    while len(os.listdir(folder)) < 2 and time.time() < deadline:
        time.sleep(0.1)
    record = ConfigRecord({"gpu_ids": ",".join(map(str, ray.get_gpu_ids())),
                           "visible": os.environ.get("CUDA_VISIBLE_DEVICES", "unset"),
                           "met": len(os.listdir(folder)) == 2})
    return Message(RecordDict({"where": record}), reply_to=message)

@server.main()
def main(grid: Grid, context: Context) -> None:
    deadline, nodes = time.time() + 60, []
    while len(nodes) < 2 and time.time() < deadline:
        nodes = list(grid.get_node_ids())
        time.sleep(0.2)
    messages = [Message(RecordDict(), dst_node_id=node, message_type="query.where") for node in nodes]
    for reply in grid.send_and_receive(messages, timeout=90):
        replies.append(dict(reply.content["where"]) if reply.has_content() else {"error": str(reply.error)})

run_simulation(server_app=server, client_app=client, num_supernodes=2, backend_config={
    "client_resources": {"num_cpus": 1, "num_gpus": float(sys.argv[1])},
    "init_args": {"num_cpus": 2, "num_gpus": 1},
})
print(json.dumps(replies))
"""


def _run(code: str, fake_root: Path | None, *args: str) -> dict:
    path = [str(ROOT)] + ([str(fake_root)] if fake_root else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    if fake_root:  # no GPU for the stand-ins; Ray, for its logical GPU, wants the variable unset
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        env.pop("CUDA_VISIBLE_DEVICES", None)
    run = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def fake_kernels(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fake-kernels")
    for name, text in _FAKE_FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def broken_kernels(tmp_path_factory) -> Path:
    """Installed but not importable, as a wheel built against another torch is."""
    root = tmp_path_factory.mktemp("broken-kernels")
    for name in ("mamba_ssm", "causal_conv1d"):
        (root / name).mkdir()
        (root / name / "__init__.py").write_text(f"raise ImportError('{name}: undefined symbol')\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def never_first(fake_kernels) -> dict:
    return _run(NEVER_FIRST, fake_kernels)


@pytest.fixture(scope="module")
def auto_on_cpu(fake_kernels) -> dict:
    return _run(AUTO_ON_CPU, fake_kernels)


@pytest.mark.slow  # starts a process
def test_probe_reports_no_kernels_on_cpu_without_importing_them(never_first):
    assert never_first["available"] is False
    assert never_first["imported_by_probe"] is False


@pytest.mark.slow  # starts a process
def test_cpu_model_reports_pytorch_even_where_transformers_bound_kernels(auto_on_cpu):
    assert auto_on_cpu["imported"] is True  # the stand-ins imported: this is the machine we mean
    assert auto_on_cpu["path"] == "pytorch"


@pytest.mark.slow  # starts a process
def test_require_on_cpu_is_a_clear_error_even_where_kernels_import(auto_on_cpu):
    message = auto_on_cpu["require"]

    assert message is not None and "`model.kernels`" in message and "CUDA is not available" in message


@pytest.mark.slow  # starts a process
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_cpu_model_never_calls_gpu_kernels(auto_on_cpu, mode):
    # The stand-ins raise when called: "ok" means every op took the PyTorch reference
    assert auto_on_cpu[mode] == "ok"


@pytest.mark.slow  # starts a process
def test_cuda_tensors_reach_the_bound_kernels(auto_on_cpu):
    # The same model, its tensors seen as CUDA ones: transformers' bound stand-ins run (and raise)
    assert auto_on_cpu["cuda_train"] == FAKE_CALLED


@pytest.mark.slow  # starts a process
def test_never_keeps_kernels_out_of_a_fresh_process(never_first):
    # The stand-ins did import with transformers' Mamba module, yet not even CUDA tensors reach them
    assert never_first["kernels_imported"] is True
    assert never_first["cpu_train"] == "ok" and never_first["cuda_train"] == "ok"


@pytest.mark.slow  # starts a process
def test_never_after_auto_holds_the_pytorch_path_for_the_process(auto_on_cpu):
    assert auto_on_cpu["cuda_train_after_never"] == "ok"


@pytest.mark.slow  # starts a process
@pytest.mark.parametrize(("packages", "expected"), [("fake_kernels", True), ("broken_kernels", False)])
def test_kernels_are_available_where_transformers_finds_them_and_they_import(request, packages, expected):
    out = _run(AS_ON_A_GPU_MACHINE, request.getfixturevalue(packages))

    assert out == {"mamba2": expected, "mamba": expected}


@pytest.mark.slow  # starts a process
def test_training_and_evaluation_run_without_datasets_installed():
    # Execute: `datasets` and flwr-datasets cannot import in this process
    out = _run(WITHOUT_DATASETS, None)

    # Assert
    assert out["imported"] == []
    assert out["steps"] == 1 and out["loss"] > 0


@pytest.mark.slow
def test_half_gpu_clients_share_one_logical_gpu_in_simulation(tmp_path):
    # Execute: the Ray backend as `client-resources-num-gpus=0.5` with `init-args-num-gpus=1` sets it
    replies = _run(GPU_FRACTIONS.replace("RENDEZVOUS", repr(str(tmp_path))), None, "0.5")

    # Assert: both ran on GPU 0, at once (each saw the other start)
    assert len(replies) == 2 and all("error" not in r for r in replies), replies
    assert [(r["gpu_ids"], r["visible"]) for r in replies] == [("0", "0"), ("0", "0")]
    assert all(r["met"] for r in replies), "the two half-GPU clients ran one after the other"


# ----------------------------------------------------------------------------- the wheel build's setup.py patch
_SETUP_PY = """
HIP_BUILD = False
FORCE_CXX11_ABI = False
if True:
    cc_flag = ["-DBUILD"]
    for arch in ("75", "80", "90", "100"):
        cc_flag.append("-gencode")
        cc_flag.append(f"arch=compute_{arch},code=sm_{arch}")
    if FORCE_CXX11_ABI:
        pass
    nvcc = ["-O3",
            "-lineinfo",
           ] + cc_flag
"""


@pytest.fixture(scope="module")
def narrow_cuda_archs():
    import importlib.util

    spec = importlib.util.spec_from_file_location("narrow_cuda_archs", ROOT / "scripts" / "narrow_cuda_archs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("archs", "expected"), [
    (["90"], ["arch=compute_90,code=sm_90"]),
    (["sm_90", "9.0", "100a"], ["arch=compute_90,code=sm_90", "arch=compute_100a,code=sm_100a"]),
])
def test_setup_py_patch_keeps_only_the_chosen_architectures(narrow_cuda_archs, archs, expected):
    # Execute: patch, then run the patched file's flag assembly
    namespace: dict = {}
    exec(compile(narrow_cuda_archs.narrow(_SETUP_PY, archs), "setup.py", "exec"), namespace)

    # Assert: other flags kept, stock architectures gone, -lineinfo dropped
    gencodes = [flag for flag in namespace["nvcc"] if flag.startswith("arch=")]
    assert gencodes == expected
    assert namespace["nvcc"][:2] == ["-O3", "-DBUILD"] and "-lineinfo" not in namespace["nvcc"]
    assert namespace["nvcc"].count("-gencode") == len(expected)


def test_setup_py_patch_refuses_unknown_layouts_and_bad_architectures(narrow_cuda_archs):
    with pytest.raises(ValueError, match="laid out differently"):
        narrow_cuda_archs.narrow("cc_flag = []\n", ["90"])
    with pytest.raises(ValueError, match="already patched"):
        narrow_cuda_archs.narrow(narrow_cuda_archs.narrow(_SETUP_PY, ["90"]), ["90"])
    with pytest.raises(ValueError, match="'hopper' is not a CUDA architecture"):
        narrow_cuda_archs.narrow(_SETUP_PY, ["hopper"])
