package server

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package's tests if any goroutine outlives them: every
// goroutine of a server must be stopped by Shutdown.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
