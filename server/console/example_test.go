package console_test

import (
	"fmt"
	"io"
	"net/http/httptest"

	"github.com/twind-io/twind/server/console"
)

// The server mounts the console under every path that is not an RPC; the
// console learns from /console.json what the server offers.
func ExampleHandler() {
	h := console.Handler(console.Config{Services: []string{"twin.v1.TwinService", "twin.v1.RuleService"}, AuthRequired: true})
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", "/console.json", nil))
	body, _ := io.ReadAll(rec.Body)
	fmt.Println(rec.Code, string(body))
	// Output: 200 {"services":["twin.v1.RuleService","twin.v1.TwinService"],"auth_required":true}
}
