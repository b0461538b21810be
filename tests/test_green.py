"""Green-context SM split on CPU: the pure planning helper, the clear errors, and the driver
call sequence against a fake ``cuda.bindings.driver`` (one split call, every CUresult checked)."""

from __future__ import annotations

import enum
import sys
from types import SimpleNamespace

import pytest
import torch

from splitlab.system import green
from splitlab.system.green import check_sm_counts, plan_split, sm_granularity, split_sms
from splitlab.errors import ConfigError, DeviceError, ModeError


# --------------------------------------------------------------------------- pure helpers


def test_granularity_by_architecture():
    assert sm_granularity((9, 0)) == 8  # H100 / H200
    assert sm_granularity((10, 0)) == 8
    assert sm_granularity((8, 0)) == 2
    assert sm_granularity((7, 5)) == 2
    assert sm_granularity((6, 1)) == 1


@pytest.mark.parametrize(
    "requested, expected",
    [
        ((40, 92), (40, 92)),  # the benchmark's split on an H200
        ((32, 100), (32, 100)),  # a split measured on an H200: 32 + 100
        ((30, 100), (32, 100)),  # rounds up to a multiple of 8
        ((33, 90), (40, 92)),  # the second group is the whole remainder
        ((1, 1), (8, 124)),
        ((120, 12), (120, 12)),
    ],
)
def test_plan_split_h200(requested, expected):
    assert plan_split(requested, 132, 8) == expected
    assert sum(plan_split(requested, 132, 8)) == 132


def test_plan_split_other_granularity():
    assert plan_split((33, 10), 108, 2) == (34, 74)  # A100
    assert plan_split([5, 5], 10, 1) == (5, 5)


@pytest.mark.parametrize(
    "bad", [(0, 10), (-8, 10), (True, 8), (8.0, 8), (40,), (8, 8, 8), "40,92", 40, None]
)
def test_malformed_counts(bad):
    with pytest.raises(ConfigError):
        check_sm_counts(bad)
    with pytest.raises(ConfigError):
        plan_split(bad, 132, 8)


@pytest.mark.parametrize("requested", [(40, 100), (130, 1), (128, 1), (132, 8)])
def test_counts_that_do_not_fit(requested):
    with pytest.raises(DeviceError, match="cannot split 132 SMs"):
        plan_split(requested, 132, 8)


# --------------------------------------------------------------------------- clear errors


def test_no_gpu_is_a_device_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeviceError, match="no CUDA GPU.*CUDA 12.4\\+ driver and cuda-python"):
        split_sms((40, 92))


def test_bad_counts_fail_before_touching_the_device(monkeypatch):
    def boom(device):
        raise AssertionError("device probed")

    monkeypatch.setattr(green, "_device_info", boom)
    with pytest.raises(ConfigError):
        split_sms((0, 92))
    with pytest.raises(ConfigError):
        split_sms((40, 92), priorities=(0,))


def test_missing_cuda_bindings_is_a_mode_error(monkeypatch):
    monkeypatch.setattr(green, "_device_info", lambda device: (132, (9, 0)))
    # make both import paths fail, whatever is installed
    for name in ("cuda", "cuda.bindings", "cuda.bindings.driver", "cuda.cuda"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ModeError, match="cuda-python"):
        split_sms((40, 92))


def test_split_that_does_not_fit_device(monkeypatch):
    monkeypatch.setattr(green, "_device_info", lambda device: (132, (9, 0)))
    monkeypatch.setattr(green, "_load_driver", lambda: pytest.fail("driver loaded"))
    with pytest.raises(DeviceError, match="rounds up to 128"):
        split_sms((121, 8))


# --------------------------------------------------------------------------- fake driver


class CUresult(enum.IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1
    CUDA_ERROR_NOT_SUPPORTED = 801


class FakeDriver:
    """Enough of cuda.bindings.driver for split_sms, with the same return conventions:
    every call returns a tuple whose first item is a CUresult."""

    CUresult = CUresult
    CUdevResourceType = SimpleNamespace(CU_DEV_RESOURCE_TYPE_SM=1)
    CUgreenCtxCreate_flags = SimpleNamespace(CU_GREEN_CTX_DEFAULT_STREAM=1)
    CUstream_flags = SimpleNamespace(CU_STREAM_NON_BLOCKING=1)

    def __init__(self, total=132, granularity=8, fail=None, version=13000, groups=1):
        self.total, self.granularity, self.fail = total, granularity, fail
        self.version, self.groups = version, groups
        self.calls = []
        self.contexts = {}

    @staticmethod
    def _res(n):
        return SimpleNamespace(sm=SimpleNamespace(smCount=n))

    def _ret(self, name, *values):
        self.calls.append(name)
        if self.fail == name:
            return (CUresult.CUDA_ERROR_NOT_SUPPORTED,)
        return (CUresult.CUDA_SUCCESS, *values)

    def cuGetErrorName(self, err):
        return (CUresult.CUDA_SUCCESS, CUresult(err).name.encode())

    def cuInit(self, flags):
        return self._ret("cuInit")

    def cuDriverGetVersion(self):
        return self._ret("cuDriverGetVersion", self.version)

    def cuDeviceGet(self, ordinal):
        return self._ret("cuDeviceGet", f"dev{ordinal}")

    def cuDeviceGetDevResource(self, dev, kind):
        assert kind == 1
        return self._ret("cuDeviceGetDevResource", self._res(self.total))

    def cuDevSmResourceSplitByCount(self, nb_groups, resource, flags, min_count):
        self.split_args = (nb_groups, resource.sm.smCount, flags, min_count)
        n = -(-min_count // self.granularity) * self.granularity
        groups = [self._res(n) for _ in range(self.groups)]
        return self._ret("cuDevSmResourceSplitByCount", groups, self.groups,
                         self._res(self.total - n * self.groups))

    def cuDevResourceGenerateDesc(self, resources, n):
        assert n == len(resources) == 1
        return self._ret("cuDevResourceGenerateDesc", ("desc", resources[0].sm.smCount))

    def cuGreenCtxCreate(self, desc, dev, flags):
        assert flags == 1 and dev == "dev0"
        ctx = f"gctx{len(self.contexts)}"
        self.contexts[ctx] = desc[1]
        return self._ret("cuGreenCtxCreate", ctx)

    def cuGreenCtxStreamCreate(self, ctx, flags, priority):
        assert flags == 1 and ctx in self.contexts
        return self._ret("cuGreenCtxStreamCreate", 0x1000 + len(self.calls))

    def cuGreenCtxGetDevResource(self, ctx, kind):
        return self._ret("cuGreenCtxGetDevResource", self._res(self.contexts[ctx]))


@pytest.fixture
def fake_gpu(monkeypatch):
    def install(driver):
        monkeypatch.setattr(green, "_device_info", lambda device: (driver.total, (9, 0)))
        monkeypatch.setattr(green, "_load_driver", lambda: driver)
        monkeypatch.setattr(green, "_activate_primary_context", lambda device: None)
        monkeypatch.setattr(green, "_wrap_stream", lambda handle, device: ("stream", handle))
        monkeypatch.setattr(green, "_KEEP_ALIVE", [])
        return driver

    return install


def test_split_call_sequence(fake_gpu):
    driver = fake_gpu(FakeDriver())
    part = split_sms((40, 92), priorities=(-1, 0))
    assert part.sm_counts == (40, 92)
    assert part.requested == (40, 92) and part.total_sms == 132 and part.granularity == 8
    # exactly ONE split call, for one group of the first count; the remainder is group two
    assert driver.calls.count("cuDevSmResourceSplitByCount") == 1
    assert driver.split_args == (1, 132, 0, 40)
    assert driver.calls.count("cuGreenCtxCreate") == 2
    assert driver.calls.count("cuGreenCtxStreamCreate") == 2
    assert part.streams[0][0] == "stream" and part.streams[0] != part.streams[1]
    # everything created is kept alive
    for obj in (*part.contexts, *part.raw_streams, *part.streams):
        assert obj in green._KEEP_ALIVE
    assert part.to_dict() == {"device": 0, "requested": [40, 92], "sm_counts": [40, 92],
                              "total_sms": 132, "granularity": 8}


def test_split_reports_rounded_counts(fake_gpu):
    driver = fake_gpu(FakeDriver())
    assert split_sms((30, 100)).sm_counts == (32, 100)
    assert driver.split_args[3] == 32  # an aligned count is asked for


def test_split_uses_the_alignment_the_driver_reports(fake_gpu):
    driver = FakeDriver(granularity=16)
    plain = driver._res

    def res(n):  # CUDA 13 resources also carry alignment and minimum partition size
        r = plain(n)
        r.sm.smCoscheduledAlignment, r.sm.minSmPartitionSize = 16, 16
        return r

    driver._res = res
    fake_gpu(driver)
    part = split_sms((40, 80))
    assert driver.split_args[3] == 48
    assert part.sm_counts == (48, 84) and part.granularity == 16
    with pytest.raises(DeviceError, match="rounds up to 48"):
        split_sms((40, 90))


@pytest.mark.parametrize(
    "call",
    ["cuInit", "cuDeviceGet", "cuDeviceGetDevResource", "cuDevSmResourceSplitByCount",
     "cuDevResourceGenerateDesc", "cuGreenCtxCreate", "cuGreenCtxStreamCreate",
     "cuGreenCtxGetDevResource"],
)
def test_every_driver_refusal_is_a_device_error(fake_gpu, call):
    fake_gpu(FakeDriver(fail=call))
    with pytest.raises(DeviceError, match=f"{call}.*CUDA_ERROR_NOT_SUPPORTED.*CUDA 12.4"):
        split_sms((40, 92))


def test_old_driver_is_a_mode_error(fake_gpu):
    fake_gpu(FakeDriver(version=12020))
    with pytest.raises(ModeError, match="CUDA 12.2.*12.4"):
        split_sms((40, 92))


def test_unexpected_group_count_is_an_error(fake_gpu):
    fake_gpu(FakeDriver(groups=0))
    with pytest.raises(DeviceError, match="made 0 groups"):
        split_sms((40, 92))
