# Debian packages (`make deb`: cpack -G DEB in a tree configured for /usr),
# split as Debian splits a C++ library with tools and Python bindings:
#
#   libtpfuse0      the shared library
#   libtpfuse-dev   headers, the .so link, the CMake package, tpfuse.pc
#   tpfuse          the command-line tool and its benchmark helpers
#   python3-tpfuse  the Python package, in /usr/lib/python3/dist-packages
#
# Run-time Depends come from dpkg-shlibdeps (the libraries each binary links:
# libdnnl2, libhwy1, libgomp1, libopenmpi3, libtorch1.13, ...); the packages'
# dependencies on each other are exact (= version), since the C++ ABI is only
# promised within a release.
set(CPACK_GENERATOR DEB)
set(CPACK_PACKAGE_NAME tpfuse)
set(CPACK_PACKAGE_VENDOR "tpfuse")
set(CPACK_PACKAGE_CONTACT "tpfuse maintainers <tpfuse@localhost>")
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY
  "fused matrix multiply + collective for tensor-parallel layers on CPUs")
set(CPACK_PACKAGE_VERSION ${PROJECT_VERSION})
set(CPACK_PACKAGING_INSTALL_PREFIX /usr)
set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
set(CPACK_DEBIAN_PACKAGE_RELEASE 1)
set(CPACK_DEBIAN_PACKAGE_SECTION science)
set(CPACK_DEB_COMPONENT_INSTALL ON)
set(CPACK_DEBIAN_ENABLE_COMPONENT_DEPENDS ON)
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
# dpkg-shlibdeps finds libtpfuse.so.0 in the build tree; the packages that
# link it name libtpfuse0 themselves (component DEPENDS below).
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS_PRIVATE_DIRS ${PROJECT_BINARY_DIR})
set(CPACK_COMPONENTS_ALL lib dev cli)
if(TARGET tpfuse_torch)
  list(APPEND CPACK_COMPONENTS_ALL python)
endif()

set(CPACK_DEBIAN_LIB_PACKAGE_NAME libtpfuse${PROJECT_VERSION_MAJOR})
set(CPACK_DEBIAN_LIB_PACKAGE_SECTION libs)
# The shlibs file, for packages built against it: any release with this
# major.minor (CPack's own covers one version only, and warns about the Python
# module, which has no soname).
math(EXPR TPFUSE_NEXT_MINOR "${PROJECT_VERSION_MINOR} + 1")
configure_file(cmake/debian/libtpfuse0/shlibs.in ${PROJECT_BINARY_DIR}/debian/shlibs @ONLY)
set(CPACK_DEBIAN_LIB_PACKAGE_CONTROL_EXTRA ${PROJECT_BINARY_DIR}/debian/shlibs)

set(CPACK_DEBIAN_DEV_PACKAGE_NAME libtpfuse-dev)
set(CPACK_DEBIAN_DEV_PACKAGE_SECTION libdevel)
set(CPACK_DEBIAN_DEV_PACKAGE_SHLIBDEPS OFF)

set(CPACK_DEBIAN_CLI_PACKAGE_NAME tpfuse)
set(CPACK_DEBIAN_CLI_PACKAGE_SUGGESTS
  "openmpi-bin, python3-torch, libopenblas0, gnuplot-nox")

set(CPACK_DEBIAN_PYTHON_PACKAGE_NAME python3-tpfuse)
set(CPACK_DEBIAN_PYTHON_PACKAGE_SECTION python)
# The extension is built against this PyTorch release's C++ ABI.
if(TARGET tpfuse_torch)
  math(EXPR TPFUSE_TORCH_NEXT_MINOR "${Torch_VERSION_MINOR} + 1")
  set(CPACK_DEBIAN_PYTHON_PACKAGE_DEPENDS "python3, python3-torch (>= ${Torch_VERSION_MAJOR}.${Torch_VERSION_MINOR}), \
python3-torch (<< ${Torch_VERSION_MAJOR}.${TPFUSE_TORCH_NEXT_MINOR})")
endif()
# Byte-compiled on install and cleaned on removal, as dh_python3 arranges, so
# that importing it as root leaves nothing behind for dpkg to trip on.
set(CPACK_DEBIAN_PYTHON_PACKAGE_CONTROL_EXTRA
  ${PROJECT_SOURCE_DIR}/cmake/debian/python3-tpfuse/postinst
  ${PROJECT_SOURCE_DIR}/cmake/debian/python3-tpfuse/prerm)

include(CPack)

cpack_add_component(lib DISPLAY_NAME "tpfuse shared library"
  DESCRIPTION "Fused matrix multiply + all-reduce for tensor-parallel layers on CPUs: the library.")
cpack_add_component(dev DEPENDS lib DISPLAY_NAME "tpfuse development files"
  DESCRIPTION "Headers, CMake package and pkg-config file for the tpfuse library.")
cpack_add_component(cli DEPENDS lib DISPLAY_NAME "tpfuse command-line tool"
  DESCRIPTION "tpfuse demo, run, plan, bench and soak: the operator from the command line.")
cpack_add_component(python DEPENDS lib DISPLAY_NAME "tpfuse for PyTorch"
  DESCRIPTION "torch_npu's npu_mm_all_reduce_base on CPU tensors, for Debian's PyTorch.")
