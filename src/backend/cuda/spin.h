// The CUDA backend's bounded spins: the common ones (flotilla/common/spin.h).
// Internal to the CUDA backend.
#pragma once

#include "flotilla/common/spin.h"

namespace flotilla::backend::cuda {

using ::flotilla::detail::cpu_relax;
using ::flotilla::detail::spin_until;

}  // namespace flotilla::backend::cuda
