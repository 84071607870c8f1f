#pragma once
#include <stdexcept>
#include <string>

namespace metricloss {

/// Thrown before anything is written when a call's arguments are malformed. The message
/// names the function, the argument and the shapes involved.
class invalid_argument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

}  // namespace metricloss
