//go:build !linux

package main

import "os/exec"

// dieWithParent does nothing outside Linux: a twind that outlives a
// killed twinsim fleet must be stopped by hand.
func dieWithParent(*exec.Cmd) {}
