// Names the calling thread, as top, perf and debuggers show it.
#pragma once

#include <pthread.h>

#include <string>

namespace flotilla::detail {

// Linux keeps 15 characters of a thread's name: longer names are cut there
// (pthread_setname_np would refuse them). Best effort: a failure is ignored.
inline void name_this_thread(const std::string& name) {
  (void)pthread_setname_np(pthread_self(), name.substr(0, 15).c_str());
}

}  // namespace flotilla::detail
