package main

import (
	"os/exec"
	"syscall"
)

// dieWithParent makes the kernel kill the twind that twinsim fleet runs
// if twinsim dies first (SIGPIPE, SIGKILL), so that no twind is left
// behind on its temporary store.
func dieWithParent(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
