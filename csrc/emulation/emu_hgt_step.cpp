// Test-only: csrc/cuda/hgt_step.cu compiled for the CPU emulation (see cuda_emulation.h).
#include "cuda_emulation.h"

#include "../cuda/hgt_step.cu"
