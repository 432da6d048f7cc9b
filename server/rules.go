package server

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	twinv1 "github.com/twind-io/twind/proto/gen/twin/v1"
	"github.com/twind-io/twind/rules"
	"github.com/twind-io/twind/twin"
)

// ruleService implements twinv1.RuleServiceServer over the rules registry.
type ruleService struct {
	twinv1.UnimplementedRuleServiceServer
	s *Server
}

// definition converts a rule from the wire. It does not validate: Compile
// does, reporting every problem at once.
func definition(r *twinv1.Rule) (rules.Definition, error) {
	if r == nil {
		return rules.Definition{}, invalid("rule is required")
	}
	def := rules.Definition{
		ID:          r.GetId(),
		Description: r.GetDescription(),
		Types:       r.GetTypes(),
		Condition:   r.GetCondition(),
		Trigger:     rules.Trigger(r.GetTrigger()),
		HoldFor:     r.GetHoldFor().AsDuration(),
		Cooldown:    r.GetCooldown().AsDuration(),
		Enabled:     r.Enabled == nil || r.GetEnabled(),
	}
	if r.Trigger == twinv1.Trigger_TRIGGER_UNSPECIFIED {
		def.Trigger = rules.Rising
	}
	for _, a := range r.GetActions() {
		var da rules.Action
		switch x := a.GetAction().(type) {
		case *twinv1.Action_Command:
			da.Command = &rules.CommandAction{Name: x.Command.GetName(), Params: x.Command.GetParams()}
		case *twinv1.Action_SetDesired:
			da.SetDesired = &rules.SetDesiredAction{Patch: x.SetDesired.GetPatch()}
		case *twinv1.Action_Emit:
			da.Emit = &rules.EmitAction{Severity: int(x.Emit.GetSeverity()), Message: x.Emit.GetMessage()}
		}
		def.Actions = append(def.Actions, da)
	}
	return def, nil
}

func ruleProto(c *rules.Compiled) *twinv1.Rule {
	d := c.Def
	enabled := d.Enabled
	r := &twinv1.Rule{
		Id:          d.ID,
		Description: d.Description,
		Types:       d.Types,
		Condition:   d.Condition,
		Trigger:     twinv1.Trigger(d.Trigger),
		Enabled:     &enabled,
		CreateTime:  timeProto(d.CreateTime),
		UpdateTime:  timeProto(d.UpdateTime),
	}
	if d.HoldFor > 0 {
		r.HoldFor = durationpb.New(d.HoldFor)
	}
	if d.Cooldown > 0 {
		r.Cooldown = durationpb.New(d.Cooldown)
	}
	for _, a := range d.Actions {
		switch {
		case a.Command != nil:
			r.Actions = append(r.Actions, &twinv1.Action{Action: &twinv1.Action_Command{Command: &twinv1.CommandAction{Name: a.Command.Name, Params: a.Command.Params}}})
		case a.SetDesired != nil:
			r.Actions = append(r.Actions, &twinv1.Action{Action: &twinv1.Action_SetDesired{SetDesired: &twinv1.SetDesiredAction{Patch: a.SetDesired.Patch}}})
		case a.Emit != nil:
			r.Actions = append(r.Actions, &twinv1.Action{Action: &twinv1.Action_Emit{Emit: &twinv1.EmitAction{Severity: twinv1.Severity(a.Emit.Severity), Message: a.Emit.Message}}})
		}
	}
	st := c.Status()
	r.Status = &twinv1.RuleStatus{
		FireCount:     st.Fires,
		LastFireTime:  timeProto(st.LastFire),
		ErrorCount:    st.Errors,
		LastError:     st.LastError,
		LastErrorTime: timeProto(st.LastErrorTime),
		CostEstimate:  c.CostEstimate,
	}
	return r
}

func (rs *ruleService) CreateRule(ctx context.Context, req *twinv1.CreateRuleRequest) (*twinv1.CreateRuleResponse, error) {
	def, err := definition(req.GetRule())
	if err != nil {
		return nil, err
	}
	c, err := rs.s.rules.Create(def)
	if err != nil {
		return nil, rs.s.status("CreateRule", err)
	}
	return &twinv1.CreateRuleResponse{Rule: ruleProto(c)}, nil
}

func (rs *ruleService) GetRule(ctx context.Context, req *twinv1.GetRuleRequest) (*twinv1.GetRuleResponse, error) {
	c, err := rs.s.rules.Get(req.GetId())
	if err != nil {
		return nil, rs.s.status("GetRule", err)
	}
	return &twinv1.GetRuleResponse{Rule: ruleProto(c)}, nil
}

func (rs *ruleService) ListRules(ctx context.Context, req *twinv1.ListRulesRequest) (*twinv1.ListRulesResponse, error) {
	size, err := pageSize(req.GetPageSize())
	if err != nil {
		return nil, err
	}
	after, err := decodePageToken("rules", req.GetPageToken())
	if err != nil {
		return nil, err
	}
	list, more := rs.s.rules.List(after, size)
	resp := &twinv1.ListRulesResponse{Rules: make([]*twinv1.Rule, len(list))}
	for i, c := range list {
		resp.Rules[i] = ruleProto(c)
	}
	if more {
		resp.NextPageToken = encodePageToken("rules", list[len(list)-1].Def.ID)
	}
	return resp, nil
}

func (rs *ruleService) UpdateRule(ctx context.Context, req *twinv1.UpdateRuleRequest) (*twinv1.UpdateRuleResponse, error) {
	def, err := definition(req.GetRule())
	if err != nil {
		return nil, err
	}
	c, err := rs.s.rules.Update(def)
	if err != nil {
		return nil, rs.s.status("UpdateRule", err)
	}
	return &twinv1.UpdateRuleResponse{Rule: ruleProto(c)}, nil
}

func (rs *ruleService) DeleteRule(ctx context.Context, req *twinv1.DeleteRuleRequest) (*twinv1.DeleteRuleResponse, error) {
	if err := rs.s.rules.Delete(req.GetId()); err != nil {
		return nil, rs.s.status("DeleteRule", err)
	}
	return &twinv1.DeleteRuleResponse{}, nil
}

func (rs *ruleService) ValidateRule(ctx context.Context, req *twinv1.ValidateRuleRequest) (*twinv1.ValidateRuleResponse, error) {
	def, err := definition(req.GetRule())
	if err != nil {
		return nil, err
	}
	c, err := rs.s.rules.Compile(def)
	var issues rules.IssuesError
	switch {
	case errors.As(err, &issues):
		resp := &twinv1.ValidateRuleResponse{}
		for _, is := range issues {
			resp.Issues = append(resp.Issues, &twinv1.RuleIssue{Field: is.Field, Message: is.Message, Line: int32(is.Line), Column: int32(is.Column)})
		}
		return resp, nil
	case err != nil:
		return nil, rs.s.status("ValidateRule", err)
	}
	return &twinv1.ValidateRuleResponse{Valid: true, CostEstimate: c.CostEstimate}, nil
}

func (rs *ruleService) TestRule(ctx context.Context, req *twinv1.TestRuleRequest) (*twinv1.TestRuleResponse, error) {
	r := req.GetRule()
	var c *rules.Compiled
	var err error
	if r != nil && r.GetCondition() == "" && r.GetId() != "" {
		c, err = rs.s.rules.Get(r.GetId()) // a saved rule
	} else {
		var def rules.Definition
		if def, err = definition(r); err != nil {
			return nil, err
		}
		if def.ID == "" {
			def.ID = "test"
		}
		c, err = rs.s.rules.Compile(def)
	}
	if err != nil {
		return nil, rs.s.status("TestRule", err)
	}
	before, after := testTwin(req.GetBefore()), testTwin(req.GetAfter())
	if after == nil {
		return nil, invalid("after is required: the twin after the change")
	}
	res := c.Test(before, after, rs.s.opts.Clock())
	resp := &twinv1.TestRuleResponse{Fired: res.Fired, Condition: res.Condition, PreviousCondition: res.PreviousCondition}
	if res.Err != nil {
		resp.Error = res.Err.Error()
		return resp, nil
	}
	for _, cmd := range res.Firing.Commands {
		tc := &twinv1.TestRuleCommand{Name: cmd.Name}
		if cmd.Params != nil {
			tc.Params = structProto(cmd.Params)
		}
		resp.Commands = append(resp.Commands, tc)
	}
	if len(res.Firing.DesiredPatches) > 0 {
		// The one patch that has the effect of the rule's set_desired
		// actions applied in turn to the twin's desired state.
		desired := after.Desired
		for _, p := range res.Firing.DesiredPatches {
			desired, _ = twin.MergePatch(desired, p)
		}
		resp.DesiredPatch = structProto(twin.DiffPatch(after.Desired, desired))
	}
	for _, e := range res.Firing.Emits {
		resp.Events = append(resp.Events, &twinv1.RuleEvent{RuleId: c.Def.ID, TwinId: after.ID, TwinVersion: after.Version,
			Kind: twinv1.RuleEventKind_RULE_EVENT_KIND_EMIT, Severity: twinv1.Severity(e.Severity), Message: e.Message})
	}
	return resp, nil
}

// testTwin converts a twin given to TestRule.
func testTwin(t *twinv1.Twin) *twin.Twin {
	if t == nil {
		return nil
	}
	out := &twin.Twin{
		ID: t.GetId(), Type: t.GetType(), Labels: t.GetLabels(),
		Reported: document(t.GetReported()), Desired: document(t.GetDesired()),
		Version: t.GetVersion(), Revision: t.GetRevision(),
		Presence: twin.Presence{Connected: t.GetPresence().GetConnected(),
			Since: asTime(t.GetPresence().GetSince()), LastSeen: asTime(t.GetPresence().GetLastSeen())},
		CreateTime: asTime(t.GetCreateTime()), UpdateTime: asTime(t.GetUpdateTime()),
	}
	out.Delta = twin.Delta(out.Desired, out.Reported, nil)
	return out
}

func asTime(ts *timestamppb.Timestamp) time.Time {
	if ts == nil {
		return time.Time{}
	}
	return ts.AsTime()
}

func (rs *ruleService) WatchRuleEvents(req *twinv1.WatchRuleEventsRequest, stream twinv1.RuleService_WatchRuleEventsServer) error {
	ctx, cancel := rs.s.streamContext(stream.Context())
	defer cancel()
	sub := rs.s.ruleEvents.subscribe(req.GetRuleId(), req.GetTwinId())
	defer rs.s.ruleEvents.unsubscribe(sub)
	// The headers say the watch is in place: a client that has them sees
	// every event from then on.
	if err := stream.SendHeader(nil); err != nil {
		return rs.s.streamStatus("WatchRuleEvents", ctx, err)
	}
	send := newSender(stream, rs.s.opts.WatchSendTimeout)
	defer send.close()
	for {
		select {
		case ev := <-sub.ch:
			if err := send.send(ctx, &twinv1.WatchRuleEventsResponse{Event: ev}); err != nil {
				if errors.Is(err, errSlowReader) {
					return status.Errorf(codes.ResourceExhausted, "the watcher did not read for %v and is ended; watch again", rs.s.opts.WatchSendTimeout)
				}
				return rs.s.streamStatus("WatchRuleEvents", ctx, err)
			}
		case <-sub.lagged:
			return status.Error(codes.ResourceExhausted, "the watcher fell behind the rule events and missed some; watch again")
		case <-ctx.Done():
			return rs.s.streamStatus("WatchRuleEvents", ctx, ctx.Err())
		}
	}
}

// newRuleRegistry loads the rules and installs them in the engine. The hub,
// the engine's OnFirings, counts the firings in their rules' statuses with
// the set in force, which it learns before the engine evaluates it.
func newRuleRegistry(e *twin.Engine, hub *ruleHub, opts Options) (*rules.Registry, error) {
	install := func(set *rules.Set) {
		hub.rules.Store(set)
		e.SetEvaluator(set)
	}
	return rules.NewRegistry(e, install, opts.Clock, opts.Logger, opts.Engine.Limits)
}

// ruleHub fans rule events out to watchers. Events are live only: a watcher
// sees what happens while it watches. Publishing never blocks; a watcher
// that falls behind is ended.
type ruleHub struct {
	// rules is the set in force, whose rules count the firings published.
	rules atomic.Pointer[rules.Set]
	// logger receives rule errors, sampled by errors.
	logger *slog.Logger
	errors *sampledLog

	mu   sync.Mutex // protects subs
	subs map[*ruleSub]struct{}
}

type ruleSub struct {
	ruleID, twinID string
	ch             chan *twinv1.RuleEvent
	lagged         chan struct{}
	lagOnce        sync.Once
}

func newRuleHub() *ruleHub { return &ruleHub{subs: map[*ruleSub]struct{}{}, errors: newSampledLog()} }

func (h *ruleHub) subscribe(ruleID, twinID string) *ruleSub {
	s := &ruleSub{ruleID: ruleID, twinID: twinID, ch: make(chan *twinv1.RuleEvent, 1024), lagged: make(chan struct{})}
	h.mu.Lock()
	h.subs[s] = struct{}{}
	h.mu.Unlock()
	return s
}

func (h *ruleHub) unsubscribe(s *ruleSub) {
	h.mu.Lock()
	delete(h.subs, s)
	h.mu.Unlock()
}

// publish is the engine's OnFirings: it runs after the firings' changes are
// durable.
func (h *ruleHub) publish(evs []twin.FiringEvent) {
	if set := h.rules.Load(); set != nil {
		set.Record(evs)
	}
	if h.logger != nil {
		for _, fe := range evs {
			if fe.Err != nil {
				h.errors.log(h.logger, slog.LevelWarn, "rule error", "rule", fe.RuleID, "twin", fe.TwinID,
					"twin_version", fe.TwinVersion, "err", fe.Err)
			}
		}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.subs) == 0 {
		return
	}
	for _, fe := range evs {
		for _, ev := range ruleEvents(fe) {
			for s := range h.subs {
				if (s.ruleID != "" && s.ruleID != ev.RuleId) || (s.twinID != "" && s.twinID != ev.TwinId) {
					continue
				}
				select {
				case s.ch <- ev:
				default:
					s.lagOnce.Do(func() { close(s.lagged) })
				}
			}
		}
	}
}

// ruleEvents converts one firing to the events watchers see: FIRED and an
// EMIT per emitted event, or ERROR.
func ruleEvents(fe twin.FiringEvent) []*twinv1.RuleEvent {
	base := func(kind twinv1.RuleEventKind) *twinv1.RuleEvent {
		return &twinv1.RuleEvent{RuleId: fe.RuleID, TwinId: fe.TwinID, TwinVersion: fe.TwinVersion, Kind: kind, Time: timeProto(fe.Time)}
	}
	if fe.Err != nil {
		ev := base(twinv1.RuleEventKind_RULE_EVENT_KIND_ERROR)
		ev.Severity, ev.Message = twinv1.Severity_SEVERITY_WARNING, fe.Err.Error()
		return []*twinv1.RuleEvent{ev}
	}
	out := []*twinv1.RuleEvent{base(twinv1.RuleEventKind_RULE_EVENT_KIND_FIRED)}
	for _, e := range fe.Emits {
		ev := base(twinv1.RuleEventKind_RULE_EVENT_KIND_EMIT)
		ev.Severity, ev.Message = twinv1.Severity(e.Severity), e.Message
		out = append(out, ev)
	}
	return out
}
