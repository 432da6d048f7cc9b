package console_test

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/twind-io/twind/clients/twind"
	"github.com/twind-io/twind/internal/testserver"
	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
	"github.com/twind-io/twind/server"
)

// The browser tests drive the console in headless Chromium (Debian's
// chromium package) against a real twind on loopback. Screenshots of each
// page go to $TWIND_SCREENSHOTS, or a temporary directory.

const liveDeadline = 10 * time.Second

// chromiumPath finds Chromium, or skips the test (fails it under CI=true).
func chromiumPath(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	msg := "no Chromium for the browser tests; install it with: sudo apt-get install -y chromium"
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}

// startTwind runs a twind on loopback and returns its address.
func startTwind(t *testing.T, opts server.Options) string {
	t.Helper()
	return testserver.StartWith(t, t.TempDir(), "", opts).Addr
}

// browser is a headless Chromium tab that records every error in its console.
type browser struct {
	t        *testing.T
	ctx      context.Context
	shots    string
	mu       sync.Mutex
	errors   []string // protected by mu
	expected []string // substrings of errors the test causes on purpose; protected by mu
}

func newBrowser(t *testing.T, width, height int) *browser {
	t.Helper()
	exe := chromiumPath(t)
	shots := os.Getenv("TWIND_SCREENSHOTS")
	if shots == "" {
		shots = t.TempDir()
	} else if err := os.MkdirAll(shots, 0o755); err != nil {
		t.Fatal(err)
	}
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(exe), chromedp.NoSandbox, chromedp.DisableGPU, chromedp.WindowSize(width, height),
		chromedp.UserDataDir(t.TempDir()))
	actx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancelTab := chromedp.NewContext(actx)
	b := &browser{t: t, ctx: ctx, shots: shots}
	messages := chromedp.Console(ctx) // starts the browser
	var wg sync.WaitGroup
	wg.Go(func() {
		for m, err := range messages {
			if err != nil {
				return
			}
			if m.Type == chromedp.ConsoleError || m.IsException() {
				b.mu.Lock()
				b.errors = append(b.errors, m.String()+" ("+m.URL+")")
				b.mu.Unlock()
			}
		}
	})
	t.Cleanup(func() {
		b.checkConsole()
		cancelTab()
		cancelAlloc()
		wg.Wait()
	})
	return b
}

// expect allows console errors containing s (a failed request the test
// makes on purpose shows there as a network error).
func (b *browser) expect(s string) {
	b.mu.Lock()
	b.expected = append(b.expected, s)
	b.mu.Unlock()
}

// checkConsole fails the test for every unexpected error in the console.
func (b *browser) checkConsole() {
	b.t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
next:
	for _, e := range b.errors {
		for _, ok := range b.expected {
			if strings.Contains(e, ok) {
				continue next
			}
		}
		b.t.Errorf("error in the page's console: %s", e)
	}
	b.errors = nil
}

func (b *browser) do(what string, actions ...chromedp.Action[chromedp.Void]) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 30*time.Second)
	defer cancel()
	if err := chromedp.Do(ctx, actions...); err != nil {
		b.t.Fatalf("%s: %v", what, err)
	}
}

// waitFor waits until the JavaScript expression is truthy, up to the
// deadline, and returns how long that took.
func (b *browser) waitFor(what, expr string, deadline time.Duration) time.Duration {
	b.t.Helper()
	start := time.Now()
	ctx, cancel := context.WithTimeout(b.ctx, deadline+5*time.Second)
	defer cancel()
	if _, err := chromedp.Run(ctx, chromedp.Poll[chromedp.Void](expr, chromedp.WithPollingTimeout(deadline))); err != nil {
		text, _ := chromedp.Run(ctx, chromedp.Evaluate[string](`document.querySelector('main').innerText.slice(0, 1500)`))
		b.screenshot("failed")
		b.t.Fatalf("%s: not within %v (%v); the page shows:\n%s", what, deadline, err, text)
	}
	return time.Since(start)
}

func (b *browser) text(sel string) string {
	b.t.Helper()
	s, err := chromedp.Run(b.ctx, chromedp.Evaluate[string](fmt.Sprintf(`document.querySelector(%q)?.innerText ?? ''`, sel)))
	if err != nil {
		b.t.Fatal(err)
	}
	return s
}

func (b *browser) screenshot(name string) {
	b.t.Helper()
	buf, err := chromedp.Run(b.ctx, chromedp.FullScreenshot(100))
	if err != nil {
		b.t.Fatalf("screenshot %s: %v", name, err)
	}
	p := filepath.Join(b.shots, name+".png")
	if err := os.WriteFile(p, buf, 0o644); err != nil {
		b.t.Fatal(err)
	}
	b.t.Logf("screenshot: %s", p)
}

// typeInto replaces the value of a field by typing, as a person would
// (input events and all).
func typeInto(sel, text string) chromedp.Action[chromedp.Void] {
	return chromedp.Steps(
		chromedp.Evaluate[chromedp.Void](fmt.Sprintf(`(() => { const el = document.querySelector(%q); el.focus(); el.value = '';
			el.dispatchEvent(new Event('input', {bubbles: true})); })()`, sel)),
		chromedp.SendKeys(chromedp.CSS(sel), text))
}

// submit submits the form of a field as pressing Enter or its submit
// button does (its submit handler runs).
func submit(sel string) chromedp.Action[chromedp.Void] {
	return chromedp.Evaluate[chromedp.Void](fmt.Sprintf(`document.querySelector(%q).form.requestSubmit()`, sel))
}

// TestConsole walks through the console as an operator would: the fleet
// updating live, a twin's state and chart following reports, desired
// edited with a conflict and a delta, commands changing state as a device
// answers, and a rule written with a mistake, fixed, and firing.
func TestConsole(t *testing.T) {
	start := time.Now()
	addr := startTwind(t, server.Options{})
	url := "http://" + addr
	ctx := context.Background()
	api, err := twind.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer api.Close()
	b := newBrowser(t, 1280, 900)

	// Fleet: a twin created through the API appears without a reload.
	b.do("open the console", chromedp.Navigate(url+"/#/fleet"))
	b.waitFor("the fleet watch is live", `document.querySelector('#fleet-live')?.textContent.includes('live') && !document.querySelector('#fleet-live').textContent.includes('not')`, liveDeadline)
	for _, id := range []string{"fridge-1", "fridge-2", "planter-1"} {
		typ := strings.TrimRight(id, "-12")
		if _, err := api.CreateTwin(ctx, id, typ, map[string]string{"site": "berlin"}); err != nil {
			t.Fatal(err)
		}
	}
	d := b.waitFor("the new twins appear in the table", `document.querySelectorAll('#twins tr[data-id]').length === 3`, liveDeadline)
	t.Logf("created twins appeared in the fleet table after %v", d)
	api.ReportState(ctx, "fridge-2", map[string]any{"temp_c": 3.9, "door": "closed"})

	// A report changes the table.
	reported := time.Now()
	if _, err := api.ReportState(ctx, "fridge-1", map[string]any{"temp_c": 4.5, "door": "closed", "power_w": 80}); err != nil {
		t.Fatal(err)
	}
	b.waitFor("the report shows in the fleet table", `document.querySelector('#twins tr[data-id="fridge-1"] .reported')?.innerText.includes('temp_c=4.5')`, liveDeadline)
	t.Logf("live update: a report showed in the fleet table %v after ReportState returned", time.Since(reported))
	b.screenshot("fleet")

	// A filter with a mistake is marked at its line and column.
	b.expect("status of 400") // the refused ListTwins, as the network logs it
	b.do("filter", typeInto("#filter", `twin.reported.temp_c > `), submit("#filter"))
	b.waitFor("the filter error names its position", `document.querySelector('#filter-error')?.innerText.includes('Line 1, column') && document.querySelector('#filter').getAttribute('aria-invalid') === 'true'`, liveDeadline)
	b.screenshot("fleet-filter-error")
	b.do("filter", typeInto("#filter", `twin.type == "fridge" && twin.reported.temp_c > 4.0`), submit("#filter"))
	b.waitFor("the filter applies", `document.querySelectorAll('#twins tr[data-id]').length === 1 && !!document.querySelector('#twins tr[data-id="fridge-1"]')`, liveDeadline)

	// Twin: state, chart and history follow reports.
	b.do("open the twin", chromedp.Navigate(url+"/#/twin/fridge-1"))
	b.waitFor("the twin watch is live", `[...document.querySelectorAll('.live')].some(e => e.textContent === '● live') && document.querySelector('.chart-box')?.dataset.points === '1'`, liveDeadline)
	b.do("chart temp_c", chromedp.SetValue(chromedp.CSS("#chart-field"), "/temp_c"),
		chromedp.Evaluate[chromedp.Void](`document.querySelector('#chart-field').dispatchEvent(new Event('change'))`))
	for _, v := range []float64{4.9, 5.6, 6.8, 7.4} {
		if _, err := api.ReportState(ctx, "fridge-1", map[string]any{"temp_c": v}); err != nil {
			t.Fatal(err)
		}
	}
	b.waitFor("the chart has every report", `document.querySelector('.chart-box')?.dataset.points === '5'`, liveDeadline)
	reported = time.Now()
	if _, err := api.ReportState(ctx, "fridge-1", map[string]any{"temp_c": 9.5, "door": "open"}); err != nil {
		t.Fatal(err)
	}
	b.waitFor("the chart and the reported table change", `document.querySelector('.chart-box')?.dataset.points === '6' && document.querySelector('#doc-reported tr[data-path="/temp_c"]')?.innerText.includes('9.5')`, liveDeadline)
	t.Logf("live update: a report showed in the twin's chart and table %v after ReportState returned", time.Since(reported))
	if note := b.text("#chart-note"); !strings.Contains(note, "6 values from") || !strings.Contains(note, "span of") {
		t.Errorf("the chart's note = %q; want what it covers", note)
	}

	// Desired: an edit from a stale version is refused with a clear
	// message; from the current one it saves and the delta shows.
	b.do("stale desired edit",
		typeInto("#desired-json", `{"target_c": 4, "eco": true}`),
		typeInto("#desired-expected", "1"),
		submit("#desired-json"))
	b.expect("status of 400") // failed_precondition is HTTP 400 in the Connect protocol
	b.waitFor("the conflict is explained", `document.querySelector('#desired-msg')?.innerText.includes('Someone else changed fridge-1')`, liveDeadline)
	b.screenshot("twin-conflict")
	b.do("desired edit", typeInto("#desired-expected", "0"), submit("#desired-json"))
	b.waitFor("the delta shows the desired change", `document.querySelector('#doc-delta tr[data-path="/target_c"]')?.innerText.includes('4') && document.querySelector('#doc-delta tr[data-path="/eco"]')`, liveDeadline)
	b.screenshot("twin")

	// Commands: a device accepts one, then succeeds; the table follows.
	tok, err := api.IssueDeviceToken(ctx, "fridge-1")
	if err != nil {
		t.Fatal(err)
	}
	release := make(chan struct{})
	devCtx, stopDevice := context.WithCancel(ctx)
	defer stopDevice()
	dev := api.Device(twind.DeviceConfig{DeviceID: "fridge-1", Token: tok, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
		OnCommand: func(ctx context.Context, c *twinv1.Command) twind.CommandResult {
			select {
			case <-release:
			case <-ctx.Done():
			}
			return twind.CommandResult{State: twinv1.CommandState_COMMAND_STATE_SUCCEEDED, Result: map[string]any{"defrosted": true}}
		}})
	var devWG sync.WaitGroup
	devWG.Go(func() { dev.Run(devCtx) })
	defer devWG.Wait()
	defer stopDevice()
	<-dev.Connected()
	b.do("open commands", chromedp.Navigate(url+"/#/commands/fridge-1"))
	b.do("send a command", typeInto("#cmd-name", "defrost"), typeInto("#cmd-params", `{"minutes": 20}`), typeInto("#cmd-wait", "0"),
		submit("#cmd-name"))
	b.waitFor("the device accepts the command", `document.querySelector('#commands tbody')?.innerText.includes('accepted')`, liveDeadline)
	close(release)
	b.waitFor("the command succeeds", `document.querySelector('#commands tbody')?.innerText.includes('succeeded')`, liveDeadline)
	b.do("send another", typeInto("#cmd-name", "defrost"), submit("#cmd-name"))
	b.screenshot("commands")

	// Rules: a mistake is marked as it is typed, fixed, saved; it fires.
	b.do("new rule", chromedp.Navigate(url+"/#/rules/new"))
	b.do("write a rule with a syntax error", typeInto("#rule-id", "fridge-warm"), typeInto("#rule-types", "fridge"),
		typeInto("#rule-condition", "twin.reported.temp_c >"))
	b.waitFor("the syntax error is marked", `document.querySelector('#issues-condition')?.innerText.includes('line 1, column') && document.querySelector('#rule-condition').getAttribute('aria-invalid') === 'true' && document.querySelector('#rule-save').disabled`, liveDeadline)
	b.screenshot("rule-error")
	b.do("fix it", chromedp.SendKeys(chromedp.CSS("#rule-condition"), " 8.0"),
		chromedp.Click(chromedp.Search(`//button[text()="Add an action"]`)))
	b.do("its message", typeInto(`#rule-actions input[placeholder^='"planter']`, `twin.id + " is warm: " + string(twin.reported.temp_c)`))
	b.waitFor("the rule is valid", `document.querySelector('#rule-valid')?.innerText.includes('Valid') && !document.querySelector('#rule-condition').hasAttribute('aria-invalid') && !document.querySelector('#rule-save').disabled`, liveDeadline)
	b.do("dry run", typeInto("#dry-twin", "fridge-1"), submit("#dry-twin"))
	b.waitFor("the dry run says it would fire", `document.querySelector('#dry-out')?.innerText.includes('It would fire')`, liveDeadline)
	b.do("create it", chromedp.Click(chromedp.CSS("#rule-save")))
	b.waitFor("the rule is listed and its events are live", `!!document.querySelector('#rules tr[data-id="fridge-warm"]') && location.hash === '#/rules/fridge-warm' && [...document.querySelectorAll('.live')].some(e => e.textContent === '● live')`, liveDeadline)
	api.ReportState(ctx, "fridge-1", map[string]any{"temp_c": 5.0})
	fired := time.Now()
	api.ReportState(ctx, "fridge-1", map[string]any{"temp_c": 9.9})
	b.waitFor("the firing shows", `document.querySelector('#rule-events')?.innerText.includes('fridge-1 is warm: 9.9')`, liveDeadline)
	t.Logf("live update: a rule event showed %v after the report that fired it", time.Since(fired))
	b.waitFor("the fire count", `document.querySelector('#rules tr[data-id="fridge-warm"] .fires')?.innerText === '1'`, liveDeadline)
	b.screenshot("rules")

	// A phone-sized screen.
	b.do("phone", chromedp.EmulateViewport(390, 844), chromedp.Navigate(url+"/#/twin/fridge-1"))
	b.waitFor("the twin page on a phone", `document.querySelector('.chart-box')?.dataset.points > 0`, liveDeadline)
	if w, err := chromedp.Run(b.ctx, chromedp.Evaluate[int](`document.documentElement.scrollWidth`)); err != nil || w > 400 {
		t.Errorf("on a 390px screen the page is %dpx wide (%v); want no sideways scrolling", w, err)
	}
	b.screenshot("twin-phone")
	t.Logf("browser test took %v", time.Since(start))
}

// TestConsoleKey: when the server requires a key, the console asks for it
// before anything else, and works with it.
func TestConsoleKey(t *testing.T) {
	addr := startTwind(t, server.Options{APIToken: "s3cret"})
	api, err := twind.Dial(addr, twind.WithToken("s3cret"))
	if err != nil {
		t.Fatal(err)
	}
	defer api.Close()
	if _, err := api.CreateTwin(context.Background(), "car-1", "car", nil); err != nil {
		t.Fatal(err)
	}
	b := newBrowser(t, 1024, 768)
	b.do("open the console", chromedp.Navigate("http://"+addr+"/"))
	b.waitFor("the key prompt", `document.querySelector('#key-dialog')?.open && document.activeElement?.id === 'key-input'`, liveDeadline)
	b.screenshot("key")
	b.do("give the key", chromedp.SendKeys(chromedp.CSS("#key-input"), "s3cret"), submit("#key-input"))
	b.waitFor("the fleet with the key", `!document.querySelector('#key-dialog').open && !!document.querySelector('#twins tr[data-id="car-1"]')`, liveDeadline)
}

// TestConsoleRoles: the console asks WhoAmI and shows only what the key's
// role may do: a viewer gets no edit controls, an operator the desired
// editor but no way to create twins or rules, an admin everything.
func TestConsoleRoles(t *testing.T) {
	addr := startTwind(t, server.Options{APIToken: "admin-key"})
	ctx := context.Background()
	api, err := twind.Dial(addr, twind.WithToken("admin-key"))
	if err != nil {
		t.Fatal(err)
	}
	defer api.Close()
	if _, err := api.CreateTwin(ctx, "fridge-1", "fridge", nil); err != nil {
		t.Fatal(err)
	}
	keys := map[string]string{}
	for _, r := range []twinv1.Role{twinv1.Role_ROLE_VIEWER, twinv1.Role_ROLE_OPERATOR} {
		k, err := api.Keys.CreateKey(ctx, &twinv1.CreateKeyRequest{Name: r.String(), Role: r})
		if err != nil {
			t.Fatal(err)
		}
		keys[r.String()] = k.GetSecret()
	}
	for _, tc := range []struct {
		key                      string
		create, newRule, desired bool
	}{
		{keys["ROLE_VIEWER"], false, false, false},
		{keys["ROLE_OPERATOR"], false, false, true},
		{"admin-key", true, true, true},
	} {
		b := newBrowser(t, 1024, 768)
		b.do("open the console", chromedp.Navigate("http://"+addr+"/"))
		b.waitFor("the key prompt", `document.querySelector('#key-dialog')?.open`, liveDeadline)
		b.do("give the key", chromedp.SendKeys(chromedp.CSS("#key-input"), tc.key), submit("#key-input"))
		b.waitFor("the fleet", `!!document.querySelector('#twins tr[data-id="fridge-1"]')`, liveDeadline)
		b.waitFor("the create form as the role allows", fmt.Sprintf(`[...document.querySelectorAll('summary')].some((s) => s.textContent === 'Create a twin') === %v`, tc.create), liveDeadline)
		b.do("open the rules", chromedp.Navigate("http://"+addr+"/#/rules"))
		b.waitFor("the rules page as the role allows", fmt.Sprintf(`!!document.querySelector('main h2, main h1') && !!document.querySelector('a[href="#/rules/new"]') === %v`, tc.newRule), liveDeadline)
		b.do("open the twin", chromedp.Navigate("http://"+addr+"/#/twin/fridge-1"))
		b.waitFor("the twin page as the role allows", fmt.Sprintf(`!!document.querySelector('main h2, main h1') && !!document.querySelector('#desired-json') === %v`, tc.desired), liveDeadline)
	}
}
