# Debian's xsimd 8.1 exports the plain target `xsimd` with INTERFACE_LINK_LIBRARIES "xtl",
# a name that resolves only when xtl's own package (xtl-dev) was found; without it the link
# line gets "-lxtl" and fails. xsimd needs xtl only for xtl complex numbers, which metricloss
# never uses, so when xtl is absent an empty interface target stands in for it.
find_package(xsimd REQUIRED)
if(NOT TARGET xtl)
  find_package(xtl QUIET)
endif()
if(NOT TARGET xtl)
  add_library(xtl INTERFACE IMPORTED)
endif()
