import pytest
import torch

from minigpt.hardware import can_compile, native_bf16, use_tensor_cores


@pytest.mark.parametrize(
    "avx512_bf16, amx, expected", [(True, False, True), (False, True, True), (False, False, False)]
)
def test_cpu_bf16_is_native_with_avx512_bf16_or_amx(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert native_bf16("cpu") is expected
    assert native_bf16(torch.device("cpu")) is expected


def test_a_torch_without_the_probes_takes_the_float32_path(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert native_bf16("cpu") is False


def test_cuda_asks_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert native_bf16("cuda") is True
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert native_bf16("cuda") is False


def test_compile_on_cpu_needs_the_cpp_compiler_inductor_finds(monkeypatch):
    import torch._inductor.cpp_builder as cpp_builder

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", lambda: "g++")
    assert can_compile("cpu") is True

    def none_found():
        raise cpp_builder.exc.InvalidCxxCompiler()

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", none_found)
    assert can_compile(torch.device("cpu")) is False


def test_compile_on_cuda_needs_triton(monkeypatch):
    import torch.utils._triton as triton

    for present in (True, False):
        monkeypatch.setattr(triton, "has_triton", lambda: present)
        assert can_compile("cuda") is present
    assert can_compile("meta") is False  # no other device is known to compile


@pytest.fixture
def matmul_precision():
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.usefixtures("matmul_precision")
def test_a_gpu_gets_tf32_for_float32_products_a_cpu_nothing():
    use_tensor_cores("cpu")
    assert torch.get_float32_matmul_precision() == "highest"
    use_tensor_cores(torch.device("cuda"))  # only the setting: no GPU needed
    assert torch.get_float32_matmul_precision() == "high"


@pytest.mark.usefixtures("matmul_precision")
def test_a_precision_the_program_chose_stays():
    torch.set_float32_matmul_precision("medium")
    use_tensor_cores("cuda")
    assert torch.get_float32_matmul_precision() == "medium"
