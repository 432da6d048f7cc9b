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
