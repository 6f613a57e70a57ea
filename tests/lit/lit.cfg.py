# -*- Python -*-
# lit configuration of the moec tool tests.
import os

import lit.formats
from lit.llvm import llvm_config

config.name = "MOEC"
config.test_format = lit.formats.ShTest(not llvm_config.use_lit_shell)
config.suffixes = [".test", ".mlir"]
config.test_source_root = os.path.dirname(__file__)
config.test_exec_root = os.path.join(config.moec_obj_root, "tests", "lit")
config.excludes = ["CMakeLists.txt", "lit.cfg.py", "lit.site.cfg.py", "Inputs"]

llvm_config.use_default_substitutions()  # FileCheck, not, count
config.substitutions.append(("%testdata", os.path.join(config.moec_src_root, "tests", "data")))
config.substitutions.append(("%inputs", os.path.join(config.test_source_root, "Tools", "Inputs")))
config.substitutions.append(("%bench", os.path.join(config.moec_obj_root, "bench")))
config.substitutions.append(("%srcroot", config.moec_src_root))
config.substitutions.append(("%testtools", os.path.join(config.moec_obj_root, "tests")))
config.substitutions.append(("%python", config.python_executable))
# The CUDA compiler, where the build found one (kernels compiled, not run).
if config.moec_have_cuda == "ON" and config.moec_cuda_compiler:
    config.available_features.add("nvcc")
    config.substitutions.append(("%nvcc", config.moec_cuda_compiler))
llvm_config.with_environment("PATH", config.moec_tools_dir, append_path=True)
llvm_config.with_environment("PATH", config.llvm_tools_dir, append_path=True)
llvm_config.add_tool_substitutions(["moec", "moec-synth", "moe-opt"], [config.moec_tools_dir])

# The report's rendering test runs where Debian's headless Chromium is installed.
import shutil
for browser in ("chromium", "chromium-browser"):
    if shutil.which(browser):
        config.available_features.add("chromium")
        config.substitutions.append(("%chromium", shutil.which(browser)))
        break

# Distributed compress (mpirun) where moec was built with MPI: local ranks
# only, over shared memory and loopback, as root in CI.
if config.moec_have_mpi == "ON" and shutil.which("mpirun"):
    config.available_features.add("mpi")
    config.substitutions.append(("%mpirun", shutil.which("mpirun") +
                                 " --oversubscribe --mca btl self,vader --mca oob_tcp_if_include lo"))
    for name in ("OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"):
        config.environment[name] = "1"

# The CLI's printed numbers are the CPU engine's: a machine with a GPU would
# otherwise run eval and generate on it (--device auto). A GPU in reach
# (nvidia-smi lists one) is the feature the device tests leave to
# moec-cuda-tests and bench/device-check.sh.
config.environment["MOEC_DEVICE"] = "cpu"
import subprocess
if shutil.which("nvidia-smi"):
    try:
        if subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=20).returncode == 0:
            config.available_features.add("cuda-device")
    except (OSError, subprocess.TimeoutExpired):
        pass
