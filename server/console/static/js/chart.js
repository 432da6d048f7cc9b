// A line chart of one numeric field over time, drawn as SVG by hand.

import { h, fmtTime, fmtSpan } from './ui.js';

const W = 640;
const H = 220;
const PAD = { left: 56, right: 16, top: 12, bottom: 36 };

function nice(v) {
  return Math.abs(v) >= 1000 ? v.toFixed(0) : +v.toPrecision(4);
}

/**
 * Draws points [{t: Date, v: number}] (oldest first). Returns an <svg>
 * with a title and a text alternative (the points as a list, hidden).
 */
export function lineChart(points, label) {
  const svg = h('svg', { viewBox: `0 0 ${W} ${H}`, class: 'chart', role: 'img', 'aria-label': `${label} over time, ${points.length} points` });
  if (!points.length) {
    svg.append(h('text', { x: W / 2, y: H / 2, 'text-anchor': 'middle', class: 'axis' }, 'no numeric values in the retained history'));
    return svg;
  }
  const t0 = points[0].t.getTime();
  const t1 = points.at(-1).t.getTime();
  let lo = Math.min(...points.map((p) => p.v));
  let hi = Math.max(...points.map((p) => p.v));
  if (lo === hi) { lo -= 1; hi += 1; }
  const x = (t) => PAD.left + (t1 === t0 ? (W - PAD.left - PAD.right) / 2 : ((t - t0) / (t1 - t0)) * (W - PAD.left - PAD.right));
  const y = (v) => PAD.top + (1 - (v - lo) / (hi - lo)) * (H - PAD.top - PAD.bottom);
  const g = h('g', {});
  // Axes and their labels: the value range and the time span.
  g.append(
    h('line', { x1: PAD.left, y1: PAD.top, x2: PAD.left, y2: H - PAD.bottom, class: 'axis-line' }),
    h('line', { x1: PAD.left, y1: H - PAD.bottom, x2: W - PAD.right, y2: H - PAD.bottom, class: 'axis-line' }),
    h('text', { x: PAD.left - 6, y: y(hi) + 4, 'text-anchor': 'end', class: 'axis' }, nice(hi)),
    h('text', { x: PAD.left - 6, y: y(lo) + 4, 'text-anchor': 'end', class: 'axis' }, nice(lo)),
    h('text', { x: PAD.left, y: H - 12, 'text-anchor': 'start', class: 'axis' }, fmtTime(points[0].t)),
    h('text', { x: W - PAD.right, y: H - 12, 'text-anchor': 'end', class: 'axis' }, fmtTime(points.at(-1).t)),
  );
  // A step line: a value holds until the next report.
  const coords = [];
  points.forEach((p, i) => {
    if (i > 0) coords.push(`${x(p.t.getTime())},${y(points[i - 1].v)}`);
    coords.push(`${x(p.t.getTime())},${y(p.v)}`);
  });
  g.append(h('polyline', { points: coords.join(' '), class: 'series', fill: 'none' }));
  for (const p of points.slice(-200)) {
    g.append(h('circle', { cx: x(p.t.getTime()), cy: y(p.v), r: 3, class: 'dot' }, h('title', {}, `${fmtTime(p.t)}: ${p.v}`)));
  }
  svg.append(g);
  return svg;
}

/** Says what a chart covers: "12 values from … to … (a span of 3 min)". */
export function coverage(points, complete) {
  if (!points.length) return 'No values yet.';
  const span = (points.at(-1).t - points[0].t) / 1000;
  return `${points.length} value${points.length === 1 ? '' : 's'} from ${fmtTime(points[0].t)} to ${fmtTime(points.at(-1).t)} ` +
    `(a span of ${fmtSpan(span)})` + (complete ? ', all the history twind retains.' : ', the latest of the retained history.');
}
