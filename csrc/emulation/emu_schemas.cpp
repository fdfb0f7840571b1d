// Test-only (tests/test_cuda_emulation.py): the op schemas and make_step_params, registered again
// under define_ops_emu by cuda_emulation.h's renamed TORCH_LIBRARY.
#include "cuda_emulation.h"

#include "../define_ops.cpp"
