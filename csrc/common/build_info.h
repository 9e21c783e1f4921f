// Build facts that sgkernels.info reports; setup.py / CMake define them.
#pragma once
#ifndef SGK_WITH_CUDA
#define SGK_WITH_CUDA 0
#endif
#ifndef SGK_CUDA_ARCHS
#define SGK_CUDA_ARCHS ""
#endif
