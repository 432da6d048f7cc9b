package twin

import "context"

// do hands an op to its worker and waits for the twin it answers.
func (e *Engine) do(ctx context.Context, o *op) (*Twin, error) {
	r, err := e.submit(ctx, o)
	return r.Twin, err
}

// submit hands an op to its worker and waits for the answer.
func (e *Engine) submit(ctx context.Context, o *op) (Result, error) {
	if err := e.start(ctx, o); err != nil {
		return Result{}, err
	}
	select {
	case r := <-o.done:
		return r, r.Err
	case <-ctx.Done():
		// The op may still commit; the caller cannot know.
		return Result{}, ctx.Err()
	}
}

// start hands an op to its worker without waiting for the answer, which
// arrives on o.done. A full inbox blocks until there is room or ctx is done.
func (e *Engine) start(ctx context.Context, o *op) error {
	if err := ValidateID(o.id); err != nil {
		return err
	}
	o.done = make(chan Result, 1)
	return e.enqueue(ctx, e.workerFor(o.id), o)
}

// Pending is a request handed to the engine whose answer has not been
// waited for.
type Pending struct{ o *op }

// Done delivers the answer, once, when the request is durable or has
// failed.
func (p Pending) Done() <-chan Result { return p.o.done }

// RunTimers makes every worker do its timed work (command expiry, hold_for,
// rule ticks) as of the engine's clock now, and returns once that work is
// durable. Workers do this by themselves on time; RunTimers is for tests and
// tools that drive a fake clock.
func (e *Engine) RunTimers(ctx context.Context) error {
	if e.opts.Follow {
		return ErrFollowing
	}
	ops := make([]*op, len(e.workers))
	e.closeMu.RLock()
	if e.closed {
		e.closeMu.RUnlock()
		return ErrClosed
	}
	for i, w := range e.workers {
		ops[i] = &op{kind: opPoke, done: make(chan Result, 1)}
		select {
		case w.inbox <- ops[i]:
		case <-ctx.Done():
			e.closeMu.RUnlock()
			return ctx.Err()
		}
	}
	e.closeMu.RUnlock()
	for _, o := range ops {
		select {
		case r := <-o.done:
			if r.Err != nil {
				return r.Err
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// StartReport hands a report to the engine and returns without waiting for
// it to be durable. Reports of one device are applied in the order they are
// started.
func (e *Engine) StartReport(ctx context.Context, req PatchRequest) (Pending, error) {
	if req.Source == "" {
		req.Source = SourceDevice
	}
	o := &op{kind: opReport, id: req.ID, patch: &req}
	return Pending{o}, e.start(ctx, o)
}

// Create creates a twin. It fails with ErrAlreadyExists if the id is taken.
func (e *Engine) Create(ctx context.Context, req CreateRequest) (*Twin, error) {
	if req.Source == "" {
		req.Source = SourceAPI
	}
	return e.do(ctx, &op{kind: opCreate, id: req.ID, create: &req})
}

// Report merges a patch into a twin's reported state.
func (e *Engine) Report(ctx context.Context, req PatchRequest) (*Twin, error) {
	if req.Source == "" {
		req.Source = SourceDevice
	}
	return e.do(ctx, &op{kind: opReport, id: req.ID, patch: &req})
}

// UpdateDesired merges a patch into a twin's desired state.
func (e *Engine) UpdateDesired(ctx context.Context, req PatchRequest) (*Twin, error) {
	if req.Source == "" {
		req.Source = SourceAPI
	}
	return e.do(ctx, &op{kind: opDesired, id: req.ID, patch: &req})
}

// Update changes a twin's type and labels.
func (e *Engine) Update(ctx context.Context, req UpdateRequest) (*Twin, error) {
	if req.Source == "" {
		req.Source = SourceAPI
	}
	return e.do(ctx, &op{kind: opUpdate, id: req.ID, update: &req})
}

// Delete deletes a twin and its history. expectedVersion, if not 0, must be
// the twin's version.
func (e *Engine) Delete(ctx context.Context, id string, expectedVersion int64) error {
	return e.DeleteBy(ctx, id, expectedVersion, SourceAPI)
}

// DeleteBy is Delete, with the source its event names.
func (e *Engine) DeleteBy(ctx context.Context, id string, expectedVersion int64, source Source) error {
	_, err := e.do(ctx, &op{kind: opDelete, id: id, expect: expectedVersion, source: source})
	return err
}

// SetTokenHash durably replaces the hash of a twin's device token. It does
// not change the twin's version.
func (e *Engine) SetTokenHash(ctx context.Context, id string, hash []byte) error {
	return e.SetTokenHashBy(ctx, id, hash, SourceAPI)
}

// SetTokenHashBy is SetTokenHash, with the source named by the presence
// event of a stream that the new token disconnects.
func (e *Engine) SetTokenHashBy(ctx context.Context, id string, hash []byte, source Source) error {
	_, err := e.do(ctx, &op{kind: opToken, id: id, token: hash, source: source})
	return err
}
