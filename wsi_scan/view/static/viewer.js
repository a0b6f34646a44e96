/* wsi-scan view: the page. Slide and heatmap are two Deep Zoom layers of the same level-0 frame
 * (the server renders heatmap tiles aligned to it); outlines are drawn on a canvas above them from
 * level-0 polygons. Every text from the data goes through textContent, never innerHTML. */
(function () {
  'use strict';
  const $ = (id) => document.getElementById(id);
  const OSD = window.OpenSeadragon;
  const LESION_COLOURS = {itc: '#ffc800', micro: '#ff7800', macro: '#dc0000'};
  const TISSUE_COLOUR = '#1f9e3a';
  // the cohort table: [key, header, digits (null: text), css class]
  const COLUMNS = [
    ['slide', 'slide', null, ''], ['call', 'call', null, ''], ['score', 'score', 3, 'num'],
    ['n_lesions', 'lesions', 0, 'num'], ['largest_lesion_mm', 'largest lesion (mm)', 2, 'num'],
    ['tumour_area_mm2', 'tumour area (mm²)', 3, 'num'], ['max_prob', 'max prob', 3, 'num'],
    ['mean_prob', 'mean prob', 3, 'num'], ['tissue_area_mm2', 'tissue (mm²)', 2, 'num'],
    ['mpp', 'µm/px', 4, 'num'], ['mpp_source', 'µm/px source', null, ''], ['seconds', 'seconds', 1, 'num'],
    ['status', 'status', null, ''], ['error', 'error', null, 'err'],
  ];
  const CALL_ORDER = {negative: 0, itc: 1, micro: 2, macro: 3};

  // everything a test (or a curious user in the console) may want to look at
  const state = {
    catalog: null, meta: null, viewer: null, base: null, slideImage: null, heatImage: null,
    opacity: 0.5, threshold: 0, heatOn: true, tissueOn: true, lesionsOn: true,
    heatVersion: 0, ready: false, cursor: null, sort: {key: 'score', dir: 'desc'}, filter: '',
  };
  window.wsiView = state;

  async function getJSON(url) {
    const r = await fetch(url);
    const j = await r.json();
    if (!r.ok) throw new Error(j.error || String(r.status));
    return j;
  }
  function fmt(v, digits) {
    if (v === null || v === undefined || v === '' || !isFinite(v)) return '';
    return Number(v).toFixed(digits);
  }
  function setStatus(text) { $('status').textContent = text || ''; }

  // ---- cohort table ------------------------------------------------------------------------
  function sortValue(row, key) {
    const v = row[key];
    if (key === 'call') return v in CALL_ORDER ? CALL_ORDER[v] : null;
    if (v === null || v === undefined || v === '') return null;
    return v;
  }
  function sortedRows() {
    const {key, dir} = state.sort;
    const rows = state.catalog.slides.filter((r) => !state.filter || r.call === state.filter);
    rows.sort((a, b) => {
      const x = sortValue(a, key), y = sortValue(b, key);
      if (x === null && y === null) return 0;
      if (x === null) return 1; // unknown values always last
      if (y === null) return -1;
      const d = (typeof x === 'number' && typeof y === 'number') ? x - y : String(x).localeCompare(String(y));
      return dir === 'asc' ? d : -d;
    });
    return rows;
  }
  function renderCohort() {
    const head = document.querySelector('#table thead tr');
    head.textContent = '';
    for (const [key, label] of COLUMNS) {
      const th = document.createElement('th');
      th.textContent = label;
      th.dataset.key = key;
      if (state.sort.key === key) th.dataset.dir = state.sort.dir;
      th.addEventListener('click', () => {
        state.sort = {key, dir: state.sort.key === key && state.sort.dir === 'desc' ? 'asc' : 'desc'};
        renderCohort();
      });
      head.appendChild(th);
    }
    const body = document.querySelector('#table tbody');
    body.textContent = '';
    const rows = sortedRows();
    for (const r of rows) {
      const tr = document.createElement('tr');
      tr.dataset.id = r.id === null ? '' : r.id;
      for (const [key, , digits, cls] of COLUMNS) {
        const td = document.createElement('td');
        td.className = cls;
        td.textContent = digits === null ? (r[key] || '') : fmt(r[key], digits);
        if (key === 'call' && r.call) td.classList.add('call-' + r.call);
        tr.appendChild(td);
      }
      if (r.id === null) tr.className = 'failed'; // no heatmap to open
      else tr.addEventListener('click', () => { location.hash = '#slide=' + r.id; });
      body.appendChild(tr);
    }
    $('count').textContent = rows.length + ' of ' + state.catalog.slides.length + ' slides';
  }

  // ---- the slide viewer --------------------------------------------------------------------
  function tileSource(meta, layer, ext, query) {
    return {
      width: meta.width, height: meta.height, tileSize: meta.tile_px, tileOverlap: 0,
      minLevel: 0, maxLevel: meta.max_level,
      getTileUrl: (level, x, y) => 'tiles/' + meta.id + '/' + layer + '/' + level + '/' + x + '_' + y + '.' + ext + (query || ''),
    };
  }
  function heatOpacity() { return state.heatOn ? state.opacity : 0; }

  function setHeatLayer() {
    const viewer = state.viewer, meta = state.meta;
    if (!viewer || !meta) return;
    const old = state.heatImage;
    const t = state.threshold.toFixed(2);
    const opts = {
      tileSource: tileSource(meta, 'heat', 'png', '?t=' + t), x: 0, y: 0, width: 1, opacity: heatOpacity(),
      success: (e) => {
        if (state.viewer !== viewer) return;
        state.heatImage = e.item;
        state.heatThreshold = Number(t);
        if (!state.base) state.base = e.item;
        state.heatVersion += 1;
        draw();
      },
    };
    if (old && viewer.world.getIndexOfItem(old) >= 0) {
      opts.index = viewer.world.getIndexOfItem(old);
      opts.replace = true;
    }
    viewer.addTiledImage(opts);
  }

  function drawLegend() {
    const c = $('legend'), ctx = c.getContext('2d');
    const lut = state.meta.lut;
    for (let i = 0; i < c.width; i++) {
      const k = Math.round(i / (c.width - 1) * 255), rgb = lut[k];
      ctx.fillStyle = 'rgb(' + rgb[0] + ',' + rgb[1] + ',' + rgb[2] + ')';
      ctx.fillRect(i, 0, 1, c.height);
    }
    const x = Math.round(state.threshold * (c.width - 1));
    ctx.fillStyle = 'rgba(255,255,255,0.65)';
    ctx.fillRect(0, 0, x, c.height); // below the threshold: not shown
    ctx.fillStyle = '#00e5ff';
    ctx.fillRect(Math.max(0, x - 1), 0, 2, c.height);
  }

  // level-0 px -> CSS px of the viewer element (no rotation: an affine map per axis)
  function l0ToScreen(x, y) {
    const p = state.base.imageToViewerElementCoordinates(new OSD.Point(x, y));
    return [p.x, p.y];
  }
  state.l0ToScreen = l0ToScreen;
  state.fullyLoaded = () => {
    const w = state.viewer && state.viewer.world;
    if (!w || w.getItemCount() === 0) return false;
    for (let i = 0; i < w.getItemCount(); i++) if (!w.getItemAt(i).getFullyLoaded()) return false;
    return true;
  };
  state.showL0 = (x0, y0, x1, y1, immediately) => {
    const r = state.base.imageToViewportRectangle(x0, y0, x1 - x0, y1 - y0);
    state.viewer.viewport.fitBounds(r, !!immediately);
  };

  function ring(ctx, pts, sx, sy, ox, oy) {
    ctx.moveTo(ox + pts[0][0] * sx, oy + pts[0][1] * sy);
    for (let i = 1; i < pts.length; i++) ctx.lineTo(ox + pts[i][0] * sx, oy + pts[i][1] * sy);
    ctx.closePath();
  }

  function draw() {
    const c = $('shapes'), el = $('osd');
    const dpr = window.devicePixelRatio || 1;
    const w = el.clientWidth, h = el.clientHeight;
    if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
      c.width = Math.round(w * dpr); c.height = Math.round(h * dpr);
      c.style.width = w + 'px'; c.style.height = h + 'px';
    }
    const ctx = c.getContext('2d');
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    if (!state.base || !state.meta) return;
    const [ox, oy] = l0ToScreen(0, 0), [px, py] = l0ToScreen(state.meta.width, state.meta.height);
    const sx = (px - ox) / state.meta.width, sy = (py - oy) / state.meta.height;
    if (state.tissueOn && state.meta.tissue.length) {
      ctx.beginPath();
      for (const pts of state.meta.tissue) ring(ctx, pts, sx, sy, ox, oy);
      ctx.strokeStyle = TISSUE_COLOUR; ctx.lineWidth = 1.5; ctx.stroke();
    }
    if (state.lesionsOn) {
      ctx.font = '12px system-ui,sans-serif';
      for (const les of state.meta.lesions) {
        ctx.beginPath();
        for (const pts of les.rings) ring(ctx, pts, sx, sy, ox, oy);
        ctx.strokeStyle = LESION_COLOURS[les.size_class] || '#f0f'; ctx.lineWidth = 2.5; ctx.stroke();
        const b = les.l0_bbox_xyxy;
        ctx.fillStyle = ctx.strokeStyle;
        ctx.fillText('#' + les.id, ox + b[0] * sx, oy + b[1] * sy - 4);
      }
    }
    drawScaleBar(sx);
  }

  function drawScaleBar(screenPerL0) {
    const umPerPx = state.meta.mpp_xy[0] / screenPerL0; // µm per CSS pixel
    const want = 120 * umPerPx;
    const p = Math.pow(10, Math.floor(Math.log10(want)));
    let nice = p;
    for (const m of [1, 2, 5]) if (m * p <= want) nice = m * p;
    const len = nice / umPerPx;
    $('scalebar-line').style.width = len.toFixed(1) + 'px';
    $('scalebar-text').textContent = nice >= 1000 ? (nice / 1000) + ' mm' : (nice >= 1 ? nice : nice.toPrecision(1)) + ' µm';
    state.scaleBar = {um: nice, px: len};
  }

  let probBusy = false, probNext = null;
  async function pumpProb() {
    if (probBusy || !probNext) return;
    const [id, x, y] = probNext;
    probNext = null;
    probBusy = true;
    try {
      const j = await getJSON('api/slide/' + id + '/prob?x=' + x + '&y=' + y);
      if (state.meta && state.meta.id === id) {
        $('cursor-p').textContent = j.prob === null ? '-' : j.prob.toFixed(3);
        state.cursor = {x: x, y: y, prob: j.prob, cell_rc: j.cell_rc};
      }
    } catch (err) {
      $('cursor-p').textContent = '?';
    } finally {
      probBusy = false;
      pumpProb();
    }
  }
  function onMove(e) {
    if (!state.base) return;
    const p = state.base.viewerElementToImageCoordinates(e.position);
    const x = Math.round(p.x * 10) / 10, y = Math.round(p.y * 10) / 10;
    $('cursor-xy').textContent = '(' + Math.round(p.x) + ', ' + Math.round(p.y) + ') px';
    probNext = [state.meta.id, x, y];
    pumpProb();
  }

  function renderLesions(meta) {
    const ol = $('lesions');
    ol.textContent = '';
    $('lesion-count').textContent = '(' + meta.lesions.length + ')';
    for (const les of meta.lesions) {
      const li = document.createElement('li');
      li.textContent = les.size_class + ' · ' + les.diameter_mm.toFixed(2) + ' mm · p ' + les.max_prob.toFixed(3);
      li.title = 'lesion #' + les.id + ': click to go there';
      li.addEventListener('click', () => {
        const b = les.l0_bbox_xyxy, pad = Math.max(b[2] - b[0], b[3] - b[1]) * 0.6 + 4 * state.meta.grid.l0_cell_size_xy[0];
        state.showL0(b[0] - pad, b[1] - pad, b[2] + pad, b[3] + pad);
      });
      ol.appendChild(li);
    }
    $('lesion-box').hidden = meta.lesions.length === 0;
  }

  async function openSlide(id) {
    state.ready = false;
    setStatus('loading…');
    const meta = await getJSON('api/slide/' + id);
    if (state.viewer) { state.viewer.destroy(); state.viewer = null; }
    state.meta = meta; state.base = null; state.slideImage = null; state.heatImage = null; state.cursor = null;
    $('cohort').hidden = true;
    $('viewer-page').hidden = false;
    $('home').hidden = !(state.catalog && state.catalog.kind === 'folder');
    $('slide-name').textContent = meta.name;
    const n = meta.lesions.length;
    $('slide-call').textContent = 'call: ' + meta.call + (n ? ' (' + n + ' lesion' + (n > 1 ? 's' : '') + ')' : '') +
      (meta.score === null ? '' : ' · score ' + meta.score.toFixed(3));
    $('slide-warning').hidden = meta.slide_available;
    $('slide-warning').textContent = meta.slide_available ? '' : 'slide not shown: ' + meta.slide_error;
    document.title = meta.name + ' · wsi-scan view';
    renderLesions(meta);
    drawLegend();
    const viewer = OSD({
      element: $('osd'), prefixUrl: 'static/openseadragon/images/', showNavigator: true, navigatorPosition: 'BOTTOM_RIGHT',
      drawer: 'canvas', imageSmoothingEnabled: false, maxZoomPixelRatio: 4, visibilityRatio: 0.5, timeout: 120000,
      imageLoaderLimit: 8, gestureSettingsMouse: {clickToZoom: false}, showRotationControl: false, crossOriginPolicy: false,
    });
    state.viewer = viewer;
    viewer.addHandler('update-viewport', draw);
    viewer.addHandler('resize', draw);
    new OSD.MouseTracker({element: viewer.canvas, moveHandler: onMove});
    if (meta.slide_available) {
      viewer.addTiledImage({
        tileSource: tileSource(meta, 'slide', 'jpeg'), x: 0, y: 0, width: 1,
        success: (e) => {
          if (state.viewer !== viewer) return;
          state.slideImage = e.item; state.base = e.item;
          setHeatLayer();
          state.ready = true; setStatus('');
        },
      });
    } else {
      setHeatLayer();
      state.ready = true; setStatus('');
    }
  }

  // ---- controls ----------------------------------------------------------------------------
  let thresholdTimer = null;
  function wire() {
    $('opacity').addEventListener('input', (e) => {
      state.opacity = Number(e.target.value);
      $('opacity-v').textContent = state.opacity.toFixed(2);
      if (state.heatImage) state.heatImage.setOpacity(heatOpacity());
    });
    $('heat-on').addEventListener('change', (e) => {
      state.heatOn = e.target.checked;
      if (state.heatImage) state.heatImage.setOpacity(heatOpacity());
    });
    $('threshold').addEventListener('input', (e) => {
      state.threshold = Number(e.target.value);
      $('threshold-v').textContent = state.threshold.toFixed(2);
      if (state.meta) drawLegend();
      clearTimeout(thresholdTimer);
      thresholdTimer = setTimeout(setHeatLayer, 150); // new tiles once the slider rests
    });
    $('tissue-on').addEventListener('change', (e) => { state.tissueOn = e.target.checked; draw(); });
    $('lesions-on').addEventListener('change', (e) => { state.lesionsOn = e.target.checked; draw(); });
    $('filter-call').addEventListener('change', (e) => { state.filter = e.target.value; renderCohort(); });
    window.addEventListener('hashchange', route);
  }

  function route() {
    const m = location.hash.match(/^#slide=(\d+)$/);
    const fail = (err) => setStatus('error: ' + err.message);
    if (state.catalog.kind === 'store') return openSlide(0).catch(fail);
    if (m) return openSlide(Number(m[1])).catch(fail);
    if (state.viewer) { state.viewer.destroy(); state.viewer = null; state.meta = null; state.base = null; }
    $('viewer-page').hidden = true;
    $('cohort').hidden = false;
    $('home').hidden = true;
    document.title = state.catalog.title + ' · wsi-scan view';
    renderCohort();
    state.ready = true;
  }

  async function main() {
    wire();
    try {
      state.catalog = await getJSON('api/catalog');
      $('title').textContent = state.catalog.title;
      $('threshold').value = 0;
      await route();
    } catch (err) {
      setStatus('error: ' + err.message);
    }
  }
  state.error = null;
  window.addEventListener('error', (e) => { state.error = String(e.message); });
  main();
})();
