// Flotilla: many host threads sharing one GPU safely and fast.
// The public API, in one include.
#pragma once

#include "flotilla/backend/driver.h"
#include "flotilla/common/config.h"
#include "flotilla/common/error.h"
#include "flotilla/nn/mlp.h"
#include "flotilla/nn/safetensors.h"
#include "flotilla/ops/ops.h"
#include "flotilla/ops/tensor.h"
#include "flotilla/runtime/allocator.h"
#include "flotilla/runtime/device.h"
#include "flotilla/runtime/encoding_lock.h"
#include "flotilla/runtime/event.h"
#include "flotilla/runtime/stream.h"
#include "flotilla/runtime/stream_pool.h"
#include "flotilla/serve/batch_queue.h"
#include "flotilla/serve/clock.h"
#include "flotilla/serve/metrics.h"
