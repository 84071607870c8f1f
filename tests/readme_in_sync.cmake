# The README's first ```cpp block must be tests/readme_example.cpp, verbatim.
file(READ "${README}" readme)
file(READ "${EXAMPLE}" example)
string(FIND "${readme}" "```cpp\n${example}```" position)
if(position EQUAL -1)
  message(FATAL_ERROR "README.md's example differs from ${EXAMPLE}; copy the file into the README")
endif()
