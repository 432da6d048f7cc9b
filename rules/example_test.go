package rules_test

import (
	"fmt"
	"time"

	"github.com/twind-io/twind/rules"
	"github.com/twind-io/twind/twin"
)

func ExampleCompileFilter() {
	f, err := rules.CompileFilter(`twin.type == "fridge" && twin.reported.temp_c > 8.0`)
	if err != nil {
		panic(err)
	}
	warm := &twin.Twin{ID: "fridge-1", Type: "fridge", Reported: twin.Document{"temp_c": 9.5}}
	quiet := &twin.Twin{ID: "fridge-2", Type: "fridge"} // has not reported yet
	fmt.Println(f.Match(warm, time.Now()), f.Match(quiet, time.Now()))
	// Output: true false
}
