package main

import (
	"strings"
	"testing"
)

// TestReviewCheckCommand: `twind check` exists, and on a directory without
// a store says so rather than reporting a clean store.
func TestReviewCheckCommand(t *testing.T) {
	err := run([]string{"check", "--data", t.TempDir()})
	if err == nil || !strings.Contains(err.Error(), "no store in") {
		t.Errorf("twind check --data DIR on an empty directory = %v; want an error saying there is no store", err)
	}
}

// TestNegativeFlagsRefused: a negative number or duration is a mistake, not
// the default that 0 asks for.
func TestNegativeFlagsRefused(t *testing.T) {
	for _, args := range [][]string{
		{"--max-depth", "-1"}, {"--workers", "-3"}, {"--log-retention", "-7"}, {"--rule-tick", "-1s"},
	} {
		err := run(append(args, "--data", t.TempDir(), "--addr", "127.0.0.1:0"))
		if err == nil || !strings.Contains(err.Error(), "must not be negative") {
			t.Errorf("twind %v = %v; want an error saying it must not be negative", args, err)
		}
	}
}
