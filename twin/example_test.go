package twin_test

import (
	"context"
	"fmt"

	"github.com/cockroachdb/pebble/v2/vfs"

	"github.com/twind-io/twind/twin"
)

func Example() {
	ctx := context.Background()
	e, err := twin.Open(twin.Options{Dir: "example", FS: vfs.NewMem()})
	if err != nil {
		panic(err)
	}
	defer e.Close()

	e.Create(ctx, twin.CreateRequest{ID: "fridge-1", Type: "fridge"})
	e.UpdateDesired(ctx, twin.PatchRequest{ID: "fridge-1", Patch: twin.Document{"target_c": 4.0, "eco": true}})
	t, _ := e.Report(ctx, twin.PatchRequest{ID: "fridge-1", Patch: twin.Document{"temp_c": 7.5, "target_c": 4.0}})
	fmt.Println("version", t.Version, "delta", t.Delta)
	// Output: version 3 delta map[eco:true]
}

func ExampleMergePatch() {
	doc := twin.Document{"door": "open", "location": map[string]any{"lat": 52.5, "lon": 13.4}}
	out, changed := twin.MergePatch(doc, twin.Document{"door": nil, "location": map[string]any{"lat": 48.1}})
	fmt.Println(out, changed)
	// Output: map[location:map[lat:48.1 lon:13.4]] true
}
