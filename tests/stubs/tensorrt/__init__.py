"""A stand-in ``tensorrt`` Python module of a given version, for the builder tests on CPU.

It has only the documented calls the builders make (TensorRT Python API, 8.6 and 10.x), so code
that calls anything else fails with AttributeError, and it enforces the documented rules the
review found broken:

- ``Builder.create_network(flags)``: below TensorRT 10 a network without
  ``1 << int(NetworkDefinitionCreationFlag.EXPLICIT_BATCH)`` is implicit-batch, which the ONNX
  parser refuses; ``STRONGLY_TYPED`` exists from TensorRT 10 (8.6 has ``EXPLICIT_PRECISION``);
- the ONNX parser names each node's layer after the node (onnx-tensorrt ``registerLayer``);
- a network with dynamic inputs needs an optimisation profile, else the build returns None;
- a strongly typed network takes no precision builder flag (FP16/INT8/precision constraints);
- INT8 with a calibrator calibrates at the calibration profile's kOPT shape (the first
  optimisation profile when none is set); a calibration cache whose header is not
  ``TRT-<NV_TENSORRT_VERSION>-EntropyCalibration2`` is ignored and the calibrator's batches are
  read instead, then ``write_calibration_cache`` gets the new cache.

``make_module(version)`` returns a fresh module; ``module.log`` lists what the builders called.
"""

from __future__ import annotations

import enum
import types

import onnx


def nv_version(version: str) -> int:
    major, minor, patch = (int(x) for x in (version.split(".") + ["0", "0"])[:3])
    return major * (10000 if major >= 10 else 1000) + minor * 100 + patch


def make_module(version: str = "10.3.0.30") -> types.ModuleType:
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    log: list[tuple] = []
    trt.log = log

    if major >= 10:
        NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag",
                                                     {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1})
    else:
        NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag",
                                                     {"EXPLICIT_BATCH": 0, "EXPLICIT_PRECISION": 1})
    BuilderFlag = enum.IntEnum("BuilderFlag", {"FP16": 0, "INT8": 1, "DEBUG": 2, "GPU_FALLBACK": 3, "REFIT": 4,
                                               "DISABLE_TIMING_CACHE": 5, "TF32": 6, "SPARSE_WEIGHTS": 7,
                                               "SAFETY_SCOPE": 8, "OBEY_PRECISION_CONSTRAINTS": 9,
                                               "PREFER_PRECISION_CONSTRAINTS": 10})
    MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0})
    DataType = enum.IntEnum("DataType", {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4})
    trt.NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag
    trt.BuilderFlag = BuilderFlag
    trt.MemoryPoolType = MemoryPoolType
    trt.DataType = DataType
    trt.float32, trt.float16, trt.int8 = DataType.FLOAT, DataType.HALF, DataType.INT8
    precision_flags = {BuilderFlag.FP16, BuilderFlag.INT8, BuilderFlag.OBEY_PRECISION_CONSTRAINTS,
                       BuilderFlag.PREFER_PRECISION_CONSTRAINTS}

    class Logger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self, min_severity=1) -> None:
            self.min_severity = min_severity

    class ILayer:
        def __init__(self, name: str, num_outputs: int) -> None:
            self.name = name
            self.num_outputs = num_outputs
            self._precision = None
            self.output_types: dict[int, object] = {}

        @property
        def precision(self):
            return self._precision

        @precision.setter
        def precision(self, dtype) -> None:
            if self._network.strongly_typed:
                raise RuntimeError("setting layer precision is not allowed in a strongly typed network")
            self._precision = dtype

        def set_output_type(self, index: int, dtype) -> None:
            if self._network.strongly_typed:
                raise RuntimeError("setting layer output types is not allowed in a strongly typed network")
            if not 0 <= index < self.num_outputs:
                raise IndexError(index)
            self.output_types[index] = dtype

    class INetworkDefinition:
        def __init__(self, flags: int) -> None:
            self.flags = flags
            self.explicit_batch = major >= 10 or bool(flags & (1 << int(NetworkDefinitionCreationFlag.EXPLICIT_BATCH)))
            self.strongly_typed = major >= 10 and bool(flags & (1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED)))
            self._layers: list[ILayer] = []
            self.inputs: dict[str, list] = {}

        @property
        def num_layers(self) -> int:
            return len(self._layers)

        def get_layer(self, index: int) -> ILayer:
            return self._layers[index]

    class OnnxParser:
        def __init__(self, network: INetworkDefinition, logger: Logger) -> None:
            self.network = network
            self._errors: list[str] = []

        @property
        def num_errors(self) -> int:
            return len(self._errors)

        def get_error(self, index: int) -> str:
            return self._errors[index]

        def parse_from_file(self, model: str) -> bool:
            if not self.network.explicit_batch:
                self._errors.append("the ONNX parser only supports networks with an explicit batch dimension")
                return False
            graph = onnx.load(model, load_external_data=False).graph
            inits = {i.name for i in graph.initializer}
            for x in graph.input:
                if x.name not in inits:
                    self.network.inputs[x.name] = [d.dim_param or d.dim_value for d in x.type.tensor_type.shape.dim]
            seen: set[str] = set()
            for node in graph.node:
                name, k = node.name, 0
                while name in seen:  # unique names, as onnx-tensorrt's generateUniqueName
                    k += 1
                    name = f"{node.name}_{k}"
                seen.add(name)
                layer = ILayer(name, len(node.output))
                layer._network = self.network
                self.network._layers.append(layer)
            return True

    class IOptimizationProfile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple] = {}

        def set_shape(self, input: str, min, opt, max) -> None:
            lo, mid, hi = tuple(min), tuple(opt), tuple(max)
            if not (len(lo) == len(mid) == len(hi) and all(a <= b <= c for a, b, c in zip(lo, mid, hi))):
                raise ValueError(f"invalid profile for {input}: {lo} {mid} {hi}")
            self.shapes[input] = (lo, mid, hi)

    class IInt8Calibrator:
        def __init__(self) -> None:
            pass

    class IInt8EntropyCalibrator2(IInt8Calibrator):
        pass

    class IBuilderConfig:
        def __init__(self) -> None:
            self.flags: set = set()
            self.pools: dict = {}
            self.profiles: list[IOptimizationProfile] = []
            self.calibration_profile: IOptimizationProfile | None = None
            self.int8_calibrator = None

        def set_flag(self, flag) -> None:
            log.append(("set_flag", BuilderFlag(flag).name))
            self.flags.add(BuilderFlag(flag))

        def set_memory_pool_limit(self, pool, pool_size: int) -> None:
            self.pools[MemoryPoolType(pool)] = int(pool_size)

        def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
            log.append(("add_optimization_profile", dict(profile.shapes)))
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def set_calibration_profile(self, profile: IOptimizationProfile) -> bool:
            log.append(("set_calibration_profile", {k: v[1] for k, v in profile.shapes.items()}))
            self.calibration_profile = profile
            return True

    class Builder:
        def __init__(self, logger: Logger) -> None:
            self.logger = logger

        def create_network(self, flags: int = 0) -> INetworkDefinition:
            log.append(("create_network", int(flags)))
            return INetworkDefinition(int(flags))

        def create_builder_config(self) -> IBuilderConfig:
            return IBuilderConfig()

        def create_optimization_profile(self) -> IOptimizationProfile:
            return IOptimizationProfile()

        def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig):
            dynamic = [n for n, dims in network.inputs.items() if any(isinstance(d, str) or d <= 0 for d in dims)]
            if dynamic and not config.profiles:
                log.append(("build_failed", "dynamic inputs without an optimization profile"))
                return None
            if network.strongly_typed and config.flags & precision_flags:
                log.append(("build_failed", "precision flags on a strongly typed network"))
                return None
            constrained = [lay.name for lay in network._layers if lay.precision is not None]
            log.append(("fp32_layers", constrained))
            if BuilderFlag.INT8 in config.flags and config.int8_calibrator is not None:
                cal = config.int8_calibrator
                prof = config.calibration_profile or (config.profiles[0] if config.profiles else None)
                cache = cal.read_calibration_cache()
                header = f"TRT-{nv_version(version)}-EntropyCalibration2"
                if cache and bytes(cache).split(b"\n", 1)[0].decode() == header:
                    log.append(("calibration_cache_used", header))
                else:
                    names = list(network.inputs)
                    n = 0
                    while True:
                        ptrs = cal.get_batch(names)
                        if ptrs is None:
                            break
                        assert len(ptrs) == len(names) and all(isinstance(p, int) and p for p in ptrs)
                        n += 1
                    log.append(("calibrated", n, {k: v[1] for k, v in prof.shapes.items()} if prof else None))
                    if n == 0:
                        log.append(("build_failed", "calibration got no batch"))
                        return None
                    cal.write_calibration_cache(f"{header}\nstub: 3c010204\n".encode())
            return memoryview(b"stub serialized engine")

    for obj in (Logger, OnnxParser, Builder, IInt8Calibrator, IInt8EntropyCalibrator2):
        setattr(trt, obj.__name__, obj)
    return trt
