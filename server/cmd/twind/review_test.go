package main

import "testing"

// TestReviewCheckCommand: issue 8's deliverable "twind check --data DIR
// checks the whole store offline" does not exist: the invariant checker is
// a test helper (twin/crash_test.go checkStore), and twind refuses the
// subcommand.
func TestReviewCheckCommand(t *testing.T) {
	if err := run([]string{"check", "--data", t.TempDir()}); err != nil {
		t.Errorf("twind check --data DIR on an empty store = %v; want it checked", err)
	}
}
