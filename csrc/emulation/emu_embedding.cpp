// Test-only: csrc/cuda/embedding.cu compiled for the CPU emulation (see cuda_emulation.h).
#include "cuda_emulation.h"

#include "../cuda/embedding.cu"
