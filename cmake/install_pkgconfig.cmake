# Runs at install time (install(SCRIPT)): writes tpfuse.pc for the prefix the
# tree is being installed under, then installs it (DESTDIR and the install
# manifest are honoured, as for every other file). The TPFUSE_PC_* variables
# are set by the install(CODE) just before this script.
set(TPFUSE_PC_PREFIX "${CMAKE_INSTALL_PREFIX}")
configure_file("${TPFUSE_PC_TEMPLATE}" "${TPFUSE_PC_STAGING}/tpfuse.pc" @ONLY)
file(INSTALL DESTINATION "${CMAKE_INSTALL_PREFIX}/${TPFUSE_PC_LIBDIR}/pkgconfig" TYPE FILE
  FILES "${TPFUSE_PC_STAGING}/tpfuse.pc")
