// Helpers for the CPU driver's tests: a driver made through the backend
// registry, and a check that a call breaks a named rule.
#pragma once

#include <gtest/gtest.h>

#include <functional>
#include <memory>
#include <string>

#include "flotilla/flotilla.h"

namespace flotilla::test {

inline std::unique_ptr<backend::Driver> make_cpu_driver(Config c = {}) {
  if (c.cpu_exec_threads == 0) c.cpu_exec_threads = 2;
  return backend::find_backend("cpu").create(0, c);
}

// Runs `fn`, which must break `rule`: a ValidationError (an InvalidState)
// naming the rule, whose message starts with `api` and ends with
// "[rule: <rule>]", counted once in DriverStats::violations. Returns the
// message ("" if the check failed).
inline std::string expect_violation(backend::Driver& drv, const std::string& rule,
                                    const std::string& api, const std::function<void()>& fn) {
  const uint64_t before = drv.stats().violations;
  std::string message;
  try {
    fn();
    ADD_FAILURE() << "rule " << rule << ": no error";
  } catch (const ValidationError& e) {
    message = e.what();
    EXPECT_EQ(e.rule(), rule) << message;
    EXPECT_EQ(e.code(), ErrorCode::kInvalidState);
    EXPECT_EQ(message.rfind("[" + api + "]", 0), 0u)
        << "should start with [" << api << "]: " << message;
    const std::string tail = "[rule: " + rule + "]";
    EXPECT_TRUE(message.size() >= tail.size() &&
                message.compare(message.size() - tail.size(), tail.size(), tail) == 0)
        << message;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "rule " << rule << ": expected ValidationError, got: " << e.what();
  }
  EXPECT_EQ(drv.stats().violations, before + 1) << "rule " << rule << " was not counted once";
  return message;
}

}  // namespace flotilla::test
