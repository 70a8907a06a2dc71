// tpfuse: fused matrix multiply + collective for tensor-parallel layers on CPUs.
// This umbrella header is the public C++ API.
#pragma once

#include "tpfuse/comm/communicator.h"
#include "tpfuse/comm/launcher.h"
#include "tpfuse/comm/registry.h"
#include "tpfuse/comm/mpi.h"
#include "tpfuse/comm/shm.h"
#include "tpfuse/comm/store.h"
#include "tpfuse/core/dtype.h"
#include "tpfuse/core/error.h"
#include "tpfuse/core/half.h"
#include "tpfuse/core/log.h"
#include "tpfuse/core/tensor.h"
#include "tpfuse/ops/family.h"
#include "tpfuse/ops/mm_all_reduce_base.h"
#include "tpfuse/ops/packed_weight.h"
#include "tpfuse/ops/quant_param.h"
#include "tpfuse/version.h"
