# What `cmake --install build --prefix P` puts under P, by component (the
# Debian packages of cmake/packaging.cmake are these components):
#
#   lib     lib/libtpfuse.so.*                          (libtpfuse0)
#   dev     include/tpfuse, lib/libtpfuse.so, the CMake package, tpfuse.pc
#                                                       (libtpfuse-dev)
#   cli     bin/tpfuse; libexec/tpfuse: the benchmarks' MPI and gloo baselines
#                                                       (tpfuse)
#   python  the `tpfuse` package in the interpreter's layout under P
#           (bindings/python/CMakeLists.txt)            (python3-tpfuse)
#
# Nothing installed refers to the build tree or to the prefix it was configured
# with: programs find the library through a relative RPATH ($ORIGIN), and the
# CMake and pkg-config files locate themselves, so a tree installed with
# --prefix P (or DESTDIR) works where it lands.
include(CMakePackageConfigHelpers)

set(TPFUSE_LIBEXECDIR ${CMAKE_INSTALL_LIBEXECDIR}/tpfuse)

# A relative RPATH from an installed program in `dir` to the library, unless
# the library lands in a directory the dynamic linker searches anyway (Debian's
# /usr/lib/<triplet> for the .deb), where an RPATH would only override it.
function(tpfuse_install_rpath target dir)
  if("${CMAKE_INSTALL_PREFIX}/${CMAKE_INSTALL_LIBDIR}" IN_LIST CMAKE_CXX_IMPLICIT_LINK_DIRECTORIES)
    return()
  endif()
  file(RELATIVE_PATH to_lib "/root/${dir}" "/root/${CMAKE_INSTALL_LIBDIR}")
  set_target_properties(${target} PROPERTIES INSTALL_RPATH "$ORIGIN/${to_lib}")
endfunction()

# lib and dev
install(TARGETS tpfuse EXPORT tpfuseTargets
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT lib NAMELINK_COMPONENT dev
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT dev)
# The testing support's headers stay out: its library is the tests' and the CLI's.
install(DIRECTORY include/tpfuse DESTINATION ${CMAKE_INSTALL_INCLUDEDIR} COMPONENT dev
  PATTERN testing EXCLUDE)
install(FILES ${PROJECT_BINARY_DIR}/include/tpfuse/version.h
  DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/tpfuse COMPONENT dev)
install(EXPORT tpfuseTargets NAMESPACE tpfuse:: DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/tpfuse
  COMPONENT dev)
configure_package_config_file(cmake/tpfuseConfig.cmake.in
  ${PROJECT_BINARY_DIR}/tpfuseConfig.cmake
  INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/tpfuse)
write_basic_package_version_file(${PROJECT_BINARY_DIR}/tpfuseConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/tpfuseConfig.cmake ${PROJECT_BINARY_DIR}/tpfuseConfigVersion.cmake
  DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/tpfuse COMPONENT dev)

# tpfuse.pc is written when it is installed, with the prefix it is installed
# under: pkg-config's ${pcfiledir} would locate it too, but its -I would then
# read /usr/lib/x86_64-linux-gnu/pkgconfig/../../../include for /usr/include,
# which pkg-config no longer recognises as a system directory to leave out.
set(TPFUSE_PC_LIBS_PRIVATE "")
if(NOT BUILD_SHARED_LIBS)
  set(TPFUSE_PC_LIBS_PRIVATE "-ldnnl -lhwy -lgomp -lrt")
endif()
install(CODE "
  set(TPFUSE_PC_TEMPLATE \"${PROJECT_SOURCE_DIR}/cmake/tpfuse.pc.in\")
  set(TPFUSE_PC_STAGING \"${PROJECT_BINARY_DIR}/pkgconfig\")
  set(TPFUSE_PC_LIBDIR \"${CMAKE_INSTALL_LIBDIR}\")
  set(TPFUSE_PC_INCLUDEDIR \"${CMAKE_INSTALL_INCLUDEDIR}\")
  set(TPFUSE_PC_VERSION \"${PROJECT_VERSION}\")
  set(TPFUSE_PC_LIBS_PRIVATE \"${TPFUSE_PC_LIBS_PRIVATE}\")" COMPONENT dev)
install(SCRIPT cmake/install_pkgconfig.cmake COMPONENT dev)

# cli
if(TPFUSE_BUILD_CLI)
  tpfuse_install_rpath(tpfuse_cli ${CMAKE_INSTALL_BINDIR})
  install(TARGETS tpfuse_cli RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR} COMPONENT cli)
  if(TARGET tpfuse_mpi_bench)
    tpfuse_install_rpath(tpfuse_mpi_bench ${TPFUSE_LIBEXECDIR})
    install(TARGETS tpfuse_mpi_bench RUNTIME DESTINATION ${TPFUSE_LIBEXECDIR} COMPONENT cli)
  endif()
  install(PROGRAMS tools/bench/gloo_allreduce.py DESTINATION ${TPFUSE_LIBEXECDIR} COMPONENT cli)
endif()
