"""The training pipeline: models, data, engine, runs, evaluation, inference, and the CLI."""

import logging


class _OptionalKernelNotice(logging.Filter):
    """bitsandbytes warns on import, on CPUs with AVX512-BF16, that it could not fetch an optional
    kernel from the Hub (`kernels` package). It falls back to its own CPU kernel, which is the one
    every figure here was measured with; the alarming line at every start would say otherwise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "gemm_4bit_forward from kernels-community" not in record.getMessage()


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_OptionalKernelNotice())
